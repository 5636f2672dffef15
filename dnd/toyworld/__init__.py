"""The toy world: procedurally rendered scenes with exact ground truth, offline.

A plug-in that provides a world, models and ground truth; the benchmarks that use them are
apps of their own (:mod:`dnd.benchmarks`).

- ``world``: vocabulary (shapes, colours, backgrounds, words, synonyms), scene descriptions.
- ``render``: ``render_scene(seed)`` -> image + description + per-concept masks + caption.
- ``target``: ``ToyCNN`` classifying the main object ("red circle"), committed weights.
- ``planted``: the planted spec: hidden channels trained to fire on known concepts.
- ``groundtruth``: each unit's best-matching concept, scored against the annotations, and
  the keyword judge of a label (``mentions``).
- ``generator``: ``ToyRenderer``, text-to-image by grounding text in the vocabulary.
- ``blip``: a tiny BLIP captioner trained on renders (``python -m dnd.toyworld.blip``).
- ``clip``: a tiny CLIP trained on renders + captions, committed weights.
- ``multimodal``: the multimodal check the toy CLIP offers text feature visualization.
- ``backends``: the captioner, generator and encoder ``toyworld``.
- ``train``: ``python -m dnd.toyworld.train`` regenerates the committed weights.
- ``probe``: the probing sets ``toyworld:N`` and their scenes.
- ``plugin``: registers the targets, backends and probing sets with dnd's registries (an
  entry point in group ``dnd.plugins``: the core never imports the toy world).

Submodules are imported on demand so that rendering does not pull in transformers.
"""
