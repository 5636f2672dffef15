"""Typed run configuration: YAML in, validated dataclasses, resolved YAML saved in the run.

A config never holds secrets: API keys are read from the environment by the backends that
need them and are not config fields.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dnd.errors import ConfigError
from dnd.record import STAGES
from dnd.settings import CropConfig, ScoreConfig, SummarizeConfig

log = logging.getLogger(__name__)

# Where candidate concepts come from: an LLM (Steps 2.2-2.4), the phrases the captions
# share (no LLM), or the LLM's candidates joined by up to summarize.consensus_extra phrases.
SUMMARIZERS = ("llm", "consensus", "llm+consensus")
# How candidates are formed from the summariser's output (dnd.stages.candidates).
CANDIDATE_LEVELS = ("levels", "phrases")
# Config sections that only the LLM summariser reads.
LLM_SECTIONS = ("llm", "summarize")
# Where the per-unit stages run (dnd.executor).
EXECUTORS = ("local", "ray")
# Backend options that change speed, never results: ignored when comparing run configs.
SPEED_OPTIONS = frozenset({"batch_size", "device", "max_concurrency", "timeout", "max_retries",
                           "backoff_base", "backoff_max"})


@dataclass(frozen=True)
class BackendConfig:
    """A swappable model: its registry ``name`` and the ``options`` its factory takes."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)


# Dictionary kinds (dnd.dictionary) -> the name a run's layers end with to describe their
# features: `--dictionary nmf --layer conv4.nmf`.
DICTIONARY_KINDS = {"nmf": "nmf", "sae": "sae", "file": "dict"}


@dataclass(frozen=True)
class DictionaryConfig:
    """Dictionary features as units (:mod:`dnd.dictionary`): ``kind`` none (neurons only),
    nmf (NMF factors of the layer's activations at positions of the probing set, the
    Building Blocks' neuron groups), sae (a TopK sparse autoencoder trained on them) or
    file (``path``: an SAE in a known layout, or a matrix of directions). A run layer
    ``<layer>.<name>`` (name: nmf, sae or dict) is then the dictionary's features of
    ``<layer>``; fitted dictionaries are saved in the run (``dictionaries/``)."""

    kind: str = "none"
    features: int = 0        # nmf, sae: number of features (0: nmf 32, sae 4x the channels)
    k: int = 8               # sae: latents active per position (TopK)
    path: str = ""           # file: the SAE folder or file, or the directions
    samples: int = 50_000    # nmf, sae: positions sampled from the probing set to fit on
    steps: int = 2000        # sae: training steps
    seed: int = 0            # nmf, sae: sampling and fitting seed

    def __post_init__(self) -> None:
        kinds = ("none", *DICTIONARY_KINDS)
        if self.kind not in kinds:
            raise ConfigError(f"dictionary.kind must be one of {', '.join(kinds)}, got "
                              f"{self.kind!r}")
        defaults = DictionaryConfig.__dataclass_fields__
        uses = {"none": (), "nmf": ("features", "samples", "seed"),
                "sae": ("features", "k", "samples", "steps", "seed"), "file": ("path",)}
        ignored = [n for n in ("features", "k", "path", "samples", "steps", "seed")
                   if n not in uses[self.kind] and getattr(self, n) != defaults[n].default]
        if ignored:
            raise ConfigError(f"dictionary.{', dictionary.'.join(ignored)} given, but "
                              f"dictionary kind {self.kind!r} does not use "
                              f"{'it' if len(ignored) == 1 else 'them'}")
        if self.kind == "file" and not self.path:
            raise ConfigError("dictionary kind file needs dictionary.path (--dictionary-path)")
        for name, low in (("features", 0), ("k", 1), ("samples", 1), ("steps", 1)):
            if getattr(self, name) < low:
                raise ConfigError(f"dictionary.{name} must be >= {low}, got "
                                  f"{getattr(self, name)}")

    @property
    def name(self) -> str | None:
        """What a run layer's name ends with to describe this dictionary's features."""
        return DICTIONARY_KINDS.get(self.kind)

    def n_features(self, channels: int) -> int:
        """Features to fit on a layer of ``channels`` channels (nmf, sae)."""
        return self.features or (32 if self.kind == "nmf" else 4 * channels)

    def fit_options(self) -> dict:
        """Keyword options of :func:`dnd.dictionary.fit.fit_dictionary` for this kind."""
        return {"k": self.k, "steps": self.steps} if self.kind == "sae" else {}


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a `dnd describe` run."""

    model: str
    # One layer by module name, or several described in one run (one pass over the probing
    # set, shared caches); a list of one is stored as its name. See ``layers``.
    layer: str | list[str]
    probe: list[str]
    weights: str = "DEFAULT"      # DEFAULT | none | weights-enum name | path to state dict
    units: str = "all"            # "all", "0-99", "3,7,10-12"
    summary: str = "mean"         # spatial mean or max of each unit's map
    stop_after: str = "labels"
    batch_size: int = 64
    workers: int = 0              # image-loading processes
    device: str = "auto"          # auto | cpu | cuda | cuda:N | mps
    chunk_units: int = 256        # units processed (and saved) together
    # Where the per-unit stages run (dnd.executor): "local" (this process) or "ray" (actors
    # of a Ray cluster, each with its own copy of the models; ``ray_address`` joins a running
    # cluster, e.g. "auto", else a local one is started; ``ray_actors`` 0 = one per GPU of
    # the cluster, or one per two CPUs without GPUs).
    executor: str = "local"
    ray_address: str | None = None
    ray_actors: int = 0
    # Generated images shared across runs (dnd.cache.ImageBank): "auto" (the environment's
    # DND_IMAGE_BANK, else the user cache folder), "none", or a folder; and its size limit.
    image_bank: str = "auto"
    image_bank_max_gb: float = 20.0
    crop: CropConfig = field(default_factory=CropConfig)
    captioner: BackendConfig = field(default_factory=lambda: BackendConfig("blip"))
    summarizer: str = "llm"       # llm | consensus (offline, no LLM) | llm+consensus
    # Candidate concepts at every level (attributes, objects, conjunctions: the summariser's
    # concepts, their parts, the words the captions share) or the summariser's phrases as
    # they are (the paper); dnd.stages.candidates.
    candidates: str = "levels"
    llm: BackendConfig = field(default_factory=lambda: BackendConfig("openai"))
    summarize: SummarizeConfig = field(default_factory=SummarizeConfig)
    generator: BackendConfig = field(default_factory=lambda: BackendConfig("diffusers"))
    encoder: BackendConfig = field(default_factory=lambda: BackendConfig("open_clip"))
    score: ScoreConfig = field(default_factory=ScoreConfig)
    dictionary: DictionaryConfig = field(default_factory=DictionaryConfig)

    def __post_init__(self) -> None:
        self._check_layers()
        self._check_dictionary()
        if self.summary not in ("mean", "max"):
            raise ConfigError(f"summary must be 'mean' or 'max', got {self.summary!r}")
        if self.stop_after not in STAGES:
            raise ConfigError(f"stop_after must be one of {', '.join(STAGES)}, "
                              f"got {self.stop_after!r}")
        for name in ("batch_size", "chunk_units"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.workers < 0:
            raise ConfigError(f"workers must be >= 0, got {self.workers}")
        self._check_executor()
        if not self.image_bank_max_gb > 0:
            raise ConfigError(f"image_bank_max_gb must be > 0, got {self.image_bank_max_gb}")
        if not self.probe:
            raise ConfigError("probe is empty: give at least one probing set")
        if self.candidates not in CANDIDATE_LEVELS:
            raise ConfigError(f"candidates must be one of {', '.join(CANDIDATE_LEVELS)}, "
                              f"got {self.candidates!r}")
        if self.candidates == "levels" and \
                self.summarize.max_candidates != SummarizeConfig.max_candidates:
            raise ConfigError("summarize.max_candidates applies to candidates 'phrases'; with "
                              "'levels' candidates are ranked by coverage and the first 8 kept")
        if self.summarizer not in SUMMARIZERS:
            raise ConfigError(f"summarizer must be one of {', '.join(SUMMARIZERS)}, "
                              f"got {self.summarizer!r}")
        parse_units(self.units, None)  # syntax check now, range check once the layer is known

    def _check_layers(self) -> None:
        """``layer``: a non-empty name, or a list of distinct names (one: stored as the name,
        so a one-layer config, its saved YAML and its records are as before lists)."""
        if isinstance(self.layer, str):
            if not self.layer.strip():
                raise ConfigError("layer is empty: name a layer (`dnd layers --model M` "
                                  "lists them)")
            return
        if not isinstance(self.layer, (list, tuple)) or not self.layer \
                or not all(isinstance(x, str) and x.strip() for x in self.layer):
            raise ConfigError(f"layer must be a layer name or a non-empty list of names, got "
                              f"{self.layer!r}")
        twice = sorted({x for x in self.layer if list(self.layer).count(x) > 1})
        if twice:
            raise ConfigError(f"layer(s) {', '.join(twice)} given twice: name each layer once")
        object.__setattr__(self, "layer", self.layer[0] if len(self.layer) == 1
                           else list(self.layer))

    def _check_dictionary(self) -> None:
        name = self.dictionary.name
        if name is None:
            return
        if not self.dictionary_layers:
            raise ConfigError(
                f"dictionary {self.dictionary.kind!r} given, but no layer names its features:"
                f" describe <layer>.{name} (e.g. --layer {self.layers[0]}.{name}; the layer "
                "itself may be described in the same run)")
        patterns = [la for la in self.dictionary_layers if any(c in la for c in "*?[")]
        if patterns:
            raise ConfigError(f"layer pattern(s) {', '.join(patterns)} with a dictionary: "
                              "name each dictionary layer in full (e.g. --layer conv4."
                              f"{name})")

    @property
    def dictionary_layers(self) -> dict[str, str]:
        """Run layer -> the layer whose dictionary features it describes (``conv4.nmf`` ->
        ``conv4``); empty without a dictionary."""
        name = self.dictionary.name
        return {la: la.rsplit(".", 1)[0] for la in self.layers
                if name and "." in la and la.rsplit(".", 1)[1] == name}

    def _check_executor(self) -> None:
        if self.executor not in EXECUTORS:
            raise ConfigError(f"executor must be one of {', '.join(EXECUTORS)}, "
                              f"got {self.executor!r}")
        if self.ray_actors < 0:
            raise ConfigError(f"ray_actors must be >= 0 (0 = one per GPU), got "
                              f"{self.ray_actors}")
        if self.executor == "ray" and self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device {self.device!r} with executor ray: use auto, cuda or "
                              "cpu (Ray gives each actor its own GPU, as cuda)")
        if self.executor != "ray":  # no setting silently ignored
            given = [k for k, v in (("ray_address", self.ray_address),
                                    ("ray_actors", self.ray_actors)) if v]
            if given:
                raise ConfigError(f"{' and '.join(given)} given, but executor is "
                                  f"{self.executor!r}: add --executor ray, or remove them")

    @property
    def layers(self) -> list[str]:
        """The layers this run describes, in the order given (one or several)."""
        return [self.layer] if isinstance(self.layer, str) else list(self.layer)

    def for_layer(self, layer: str) -> RunConfig:
        """This config for one of its layers: what the per-unit stages, which describe one
        layer at a time, are given (``config.layer`` is then that layer's name)."""
        if layer not in self.layers:
            raise ValueError(f"layer {layer!r} is not one of this run's layers "
                             f"({', '.join(self.layers)})")
        # A layer that is not a dictionary layer has no dictionary to describe.
        dictionary = (self.dictionary if layer in self.dictionary_layers
                      else DictionaryConfig())
        return dataclasses.replace(self, layer=layer, dictionary=dictionary)

    def open_image_bank(self):
        """The :class:`dnd.cache.ImageBank` of ``image_bank``, or None for ``none``. "auto":
        ``$DND_IMAGE_BANK`` (which may say ``none``) if set, else
        ``$XDG_CACHE_HOME/dnd/image-bank`` (default ``~/.cache/dnd/image-bank``)."""
        from dnd.cache import ImageBank

        where = self.image_bank
        if where == "auto":
            where = os.environ.get("DND_IMAGE_BANK") or str(
                Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
                / "dnd" / "image-bank")
        if where.lower() == "none":
            return None
        return ImageBank(Path(where).expanduser(), int(self.image_bank_max_gb * 2**30))

    @property
    def uses_llm(self) -> bool:
        """Whether the summariser asks the ``llm`` backend."""
        return self.summarizer != "consensus"

    def to_dict(self) -> dict[str, Any]:
        """Plain data; the LLM sections are left out when the summariser uses no LLM."""
        d = dataclasses.asdict(self)
        if not self.uses_llm:
            for section in LLM_SECTIONS:
                d.pop(section)
        if self.dictionary.kind == "none":  # as before dictionaries existed
            d.pop("dictionary")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        """Build from plain data, rejecting unknown keys and wrong types with clear errors."""
        return _build(cls, d, "")

    def results_key(self) -> dict[str, Any]:
        """The settings that change results; a run directory never mixes two of these."""
        d = self.to_dict()
        if not isinstance(self.layer, str):  # the order layers are described in changes nothing
            d["layer"] = sorted(self.layer)
        for k in ("units", "stop_after", "batch_size", "workers", "device", "chunk_units",
                  "image_bank", "image_bank_max_gb", "executor", "ray_address", "ray_actors"):
            d.pop(k)
        d["crop"].pop("batch_size")
        d["score"].pop("batch_size")
        # The LLM section is absent when the summariser uses no LLM (to_dict).
        for backend in ("captioner", "llm", "generator", "encoder"):
            if backend in d:
                d[backend]["options"] = {k: v for k, v in d[backend]["options"].items()
                                         if k not in SPEED_OPTIONS}
        return d


PRESETS_DIR = Path(__file__).parent / "presets"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def _read_yaml(path: Path) -> dict[str, Any]:
    """The mapping in a YAML file; a missing file or bad YAML raises a one-line
    :class:`ConfigError` naming the file (and line and column)."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (IsADirectoryError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not a readable YAML text file ({e})") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(_yaml_error_message(path, e)) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config is a mapping of keys to values")
    return data


def _yaml_error_message(path: Path, e: yaml.YAMLError) -> str:
    """'run.yaml:3:5: invalid YAML: expected ',' or ']' (while parsing a flow sequence
    started at line 2)': 1-based line and column of the problem, on one line."""
    mark = getattr(e, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    context, cmark = getattr(e, "context", None), getattr(e, "context_mark", None)
    if context:
        problem += f" ({context}" + (f" started at line {cmark.line + 1}" if cmark is not None
                                     and mark is not None and cmark.line != mark.line
                                     else "") + ")"
    return f"{where}: invalid YAML: {problem}"


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                preset: str | None = None) -> RunConfig:
    """Resolve a config: ``preset`` < YAML file at ``path`` < ``overrides``.

    ``overrides`` use dotted keys (``crop.top_n``, ``llm.options.model``).

    Naming LLM settings (``llm``, ``summarize``) in the file or overrides switches a
    preset's ``consensus`` summariser to ``llm``; with ``summarizer: consensus`` given
    explicitly they are an error, as they would do nothing; so is
    ``summarize.consensus_extra`` with a summariser other than ``llm+consensus``. (Options a
    backend does not take are refused when the backends are checked:
    :mod:`dnd.backends.factory`.)
    """
    data: dict[str, Any] = {}
    if preset is not None:
        if preset not in preset_names():
            raise ConfigError(f"unknown preset {preset!r}; choose one of "
                              f"{', '.join(preset_names())}")
        data = _read_yaml(PRESETS_DIR / f"{preset}.yaml")
    user = _read_yaml(Path(path)) if path is not None else {}
    data = _deep_merge(data, user)
    overrides = dict(overrides or {})
    named_llm = sorted({k for k in [*user, *overrides] if k.split(".")[0] in LLM_SECTIONS})
    if named_llm and "summarizer" not in user and "summarizer" not in overrides \
            and data.get("summarizer", RunConfig.summarizer) == "consensus":
        log.info("LLM settings given (%s): the summariser is 'llm' instead of the preset's "
                 "'consensus'", ", ".join(named_llm))
        overrides["summarizer"] = "llm"
    config = RunConfig.from_dict(merge_overrides(data, overrides))
    if named_llm and not config.uses_llm:
        raise ConfigError(f"LLM settings given ({', '.join(named_llm)}), but summarizer "
                          "'consensus' uses no LLM: remove them, or choose summarizer 'llm' "
                          "or 'llm+consensus' (--summarizer)")
    if _given(user, overrides, "summarize", "consensus_extra") \
            and config.summarizer != "llm+consensus":
        raise ConfigError(f"summarize.consensus_extra given, but summarizer "
                          f"{config.summarizer!r} adds no consensus phrases to the LLM's "
                          "candidates: remove it, or choose summarizer 'llm+consensus'")
    return config


def _given(user: dict[str, Any], overrides: dict[str, Any], section: str, key: str) -> bool:
    """Whether the user's file or the overrides set ``section.key`` (not a preset)."""
    return f"{section}.{key}" in overrides or any(
        isinstance(d.get(section), dict) and key in d[section] for d in (user, overrides))


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and not _switches_backend(
                out[k], v.get("name")):
            out[k] = _deep_merge(out[k], v)
        else:  # a new value, or another backend: the old backend's options do not carry
            out[k] = v
    return out


def _switches_backend(node: dict[str, Any], name: Any) -> bool:
    """Whether setting ``name`` on a backend section (``{name, options}``) picks another
    backend, whose options then start empty (``model: gpt-4o-mini`` is not a setting of a
    local LLM)."""
    return name is not None and "name" in node and node["name"] != name


def merge_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Copy of ``data`` with dotted-key ``overrides`` set (``crop.top_n`` -> data[crop][top_n]).

    A ``<section>.name`` override that switches backend drops the section's old options
    first; ``<section>.options.*`` overrides then apply to the new backend."""
    out = _deep_merge({}, data)
    # Backend switches first, so options given alongside them are kept.
    ordered = sorted(overrides.items(), key=lambda kv: not kv[0].endswith(".name"))
    for key, value in ordered:
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node[p] = dict(node.get(p) or {})
            node = node[p]
        if leaf == "name" and parents and _switches_backend(node, value):
            node.pop("options", None)
        node[leaf] = value
    return out


def save_config(config: RunConfig, path: Path) -> None:
    from dnd.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))


def _build(cls, d: Any, prefix: str):
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
                          f"valid keys: {', '.join(prefix + k for k in fields)}")
    kwargs = {}
    for name, value in d.items():
        if hints[name] is BackendConfig and isinstance(value, dict) and "name" not in value \
                and fields[name].default_factory is not dataclasses.MISSING:
            # Options without a name ('--base-url URL' alone) are for the default backend.
            value = {"name": fields[name].default_factory().name, **value}
        kwargs[name] = _coerce(hints[name], value, prefix + name)
    missing = [n for n, f in fields.items() if n not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"missing config key(s): {', '.join(prefix + m for m in missing)}")
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _coerce(tp, value, key: str):
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".")
    origin = typing.get_origin(tp)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    if origin is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key} must be a list of strings, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise ConfigError(f"{key} must be {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def parse_units(spec: str, n_units: int | None) -> list[int]:
    """Parse ``all``, ``7``, ``0-99`` or ``0,5,10-12`` into sorted unit ids.

    With ``n_units`` given, ids outside ``0..n_units-1`` raise a :class:`ConfigError` naming
    the valid range. ``all`` needs ``n_units``.
    """
    spec = str(spec).strip()
    if spec == "all":
        return list(range(n_units)) if n_units is not None else []
    units: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if hi < lo:
                    raise ValueError
                units.update(range(lo, hi + 1))
            else:
                units.add(int(part))
        except ValueError:
            raise ConfigError(f"bad unit spec {spec!r}: use 'all', '7', '0-99' or "
                              "'0,5,10-12'") from None
    if n_units is not None:
        bad = sorted(u for u in units if not 0 <= u < n_units)
        if bad:
            raise ConfigError(f"unit id(s) {bad[:5]} out of range: this layer has {n_units} "
                              f"units, valid ids are 0-{n_units - 1}")
    return sorted(units)
