"""The toy world: procedurally rendered scenes with exact ground truth, offline.

- ``world``: vocabulary (shapes, colours, backgrounds, words, synonyms), scene descriptions.
- ``render``: ``render_scene(seed)`` -> image + description + per-concept masks + caption.
- ``target``: ``ToyCNN`` classifying the main object ("red circle"), committed weights.
- ``groundtruth``: each unit's best-matching concept, scored against the annotations.
- ``generator``: ``ToyRenderer``, text-to-image by grounding text in the vocabulary.
- ``clip``: a tiny CLIP trained on renders + captions, committed weights.
- ``train``: ``python -m dnd.toyworld.train`` regenerates the committed weights.
- ``probe``: the probing sets ``toyworld:N``.
- ``plugin``: registers the target, backends and probing sets with dnd's registries (an
  entry point in group ``dnd.plugins``: the core never imports the toy world).

Submodules are imported on demand so that rendering does not pull in transformers.
"""
