"""``dnd tables``: regenerate the evaluation tables defined in ``eval/tables.yaml``.

Each table becomes ``<out_dir>/<name>.md`` stating the command that regenerates it, the
models, embedders and data used, and the numbers. A table whose data files are missing
under ``data_root``, or whose models cannot be loaded here, is written as
"not run: needs ...", never filled with guesses.
"""

from __future__ import annotations

import dataclasses
import logging
import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from dnd.benchmarks.common import md_table
from dnd.evaluation.classifier_search import (
    DEFAULT_CACHE_DIR,
    classifier_search_needs,
    run_classifier_search,
)
from dnd.evaluation.embedders import (
    CachedEmbedder,
    TextEmbedder,
    create_embedder,
    embedder_needs,
)
from dnd.evaluation.final_layer import (
    constant_labels,
    final_layer_needs,
    final_layer_similarity,
    model_class_names,
)
from dnd.evaluation.labels import UnitLabels, read_labels
from dnd.evaluation.milan import (
    MILAN_TABLE_HEADER,
    best_pair_similarity,
    layer_sort_key,
    matching_threshold,
    milan_scores,
    milan_table_rows,
    read_annotations,
    reliable_threshold,
)
from dnd.io import atomic_write_text
from dnd.preflight import ModelsNotAvailable, Need, check
from dnd.registry import unknown_name_message

log = logging.getLogger(__name__)

# eval/ sits at the repository root next to dnd/ (tables are a repository artefact).
DEFAULT_DEFINITIONS = Path(__file__).resolve().parents[2] / "eval" / "tables.yaml"


class NotRun(Exception):
    """A table cannot be computed on this machine; the message says what it needs."""


@dataclass(frozen=True)
class TableSpec:
    """One table of ``eval/tables.yaml`` (see the comment at its top for the keys).

    ``data``: role -> path under the data root, or a mapping of them (milan labels:
    layer -> path; milan compare: method -> path or layer -> path).
    ``options``: the kind's own settings (labels, baselines, layer, probe_kind, threshold,
    method, thresholds, match_reliable).
    """

    name: str
    kind: str
    title: str
    models: tuple[str, ...]
    embedders: tuple[str, ...]
    command: str
    data: Mapping[str, Any] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, name: str, d: Mapping[str, Any]) -> TableSpec:
        d = dict(d)
        missing = {"kind", "title", "models", "embedders", "command"} - set(d)
        if missing:
            raise ValueError(f"table {name!r}: missing key(s) {', '.join(sorted(missing))}")
        if d["kind"] not in RUNNERS:
            raise ValueError(f"table {name!r}: "
                             + unknown_name_message("table kind", d["kind"], list(RUNNERS)))
        return cls(name=name, kind=d.pop("kind"), title=" ".join(d.pop("title").split()),
                   models=tuple(d.pop("models")), embedders=tuple(d.pop("embedders")),
                   command=" ".join(d.pop("command").split()), data=d.pop("data", None) or {},
                   options=d)

    def data_files(self) -> list[str]:
        """Every data path the table needs, relative to the data root."""
        def paths(v: Any) -> list[str]:
            return ([p for x in v.values() for p in paths(x)] if isinstance(v, Mapping)
                    else [v])
        return paths(self.data)


def load_tables(path: str | Path = DEFAULT_DEFINITIONS) -> dict[str, TableSpec]:
    """Table name -> :class:`TableSpec`, in file order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"table definitions not found: {path} (dnd tables runs from "
                                f"a checkout of the repository, which holds eval/)")
    raw = yaml.safe_load(path.read_text()) or {}
    return {name: TableSpec.from_dict(name, d) for name, d in raw.items()}


def run_tables(names: Sequence[str] | None = None, out_dir: str | Path = "results",
               data_root: str | Path | None = None, *,
               definitions: str | Path = DEFAULT_DEFINITIONS,
               cache_dir: str | Path = DEFAULT_CACHE_DIR,
               embedders: Mapping[str, TextEmbedder] | None = None,
               planted_spec: str | Path | None = None,
               planted_weights: str | Path | None = None,
               progress: bool = True) -> dict[str, Path]:
    """Regenerate tables ``names`` (default: all) into ``out_dir/<name>.md``.

    ``data_root``: folder holding the tables' data files (None: none available).
    ``cache_dir``: activation cache (keep it out of ``out_dir``). ``embedders``: already
    loaded embedders by name, shared across tables (others are loaded once, on first use).
    ``planted_spec``, ``planted_weights``: the planted spec file and the weights (folder or
    file) trained for it (``dnd tables --spec FILE --weights DIR``), for tables of kind
    ``toyworld_planted`` only (refused when another table is selected, which would ignore
    them); with a spec, a table is written as ``<name>-<spec file stem>.md`` so the
    committed spec's table stays. Returns name -> written file.
    """
    specs = load_tables(definitions)
    for n in names or []:
        if n not in specs:
            raise KeyError(unknown_name_message("table", n, list(specs)))
    planted = _planted_settings(planted_spec, planted_weights,
                                [specs[n] for n in (names or specs)])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    loaded = {name: CachedEmbedder(e) for name, e in (embedders or {}).items()}
    written = {}
    for spec in (specs[n] for n in (names or specs)):
        if planted:
            spec = dataclasses.replace(spec, options={**spec.options, **planted})
        try:
            body, status = _run_one(spec, data_root, loaded, Path(cache_dir), progress), "run"
        except NotRun as e:
            body, status = [f"**not run: needs {e}**"], "not run"
        log.info("table %s: %s", spec.name, status)
        stem = f"{spec.name}-{Path(planted_spec).stem}" if planted_spec else spec.name
        written[spec.name] = atomic_write_text(
            out_dir / f"{stem}.md",
            "\n".join(_header(spec, out_dir, data_root, planted) + body) + "\n")
    return written


def _planted_settings(planted_spec: str | Path | None, planted_weights: str | Path | None,
                      selected: Sequence[TableSpec]) -> dict[str, str]:
    """The ``spec``/``weights`` options that ``--spec``/``--weights`` give the selected
    tables; refuses them (before anything runs) when a selected table is not of kind
    ``toyworld_planted``, when the spec is invalid or the weights are missing."""
    given = {k: str(v) for k, v in (("spec", planted_spec), ("weights", planted_weights))
             if v is not None}
    if not given:
        return {}
    flags = " and ".join(f"--{k}" for k in given)
    others = [s.name for s in selected if s.kind != "toyworld_planted"]
    if others:
        raise ValueError(f"{flags} apply to tables of kind toyworld_planted only, and "
                         f"{', '.join(others)} would ignore them: select the planted "
                         f"table with `--only toyworld_planted`")
    from dnd.benchmarks.planted import check_trained_for_planted
    from dnd.toyworld.planted import PLANTED, load_spec

    weights = given.get("weights", "DEFAULT")
    if weights != "DEFAULT" and not Path(weights).exists():
        raise FileNotFoundError(f"--weights {weights}: no such folder or file; train it with "
                                "`python -m dnd.toyworld.train --only planted --spec FILE "
                                "--out DIR`")
    # A bad spec, or weights trained for other units, fail here, before anything runs.
    check_trained_for_planted(weights, load_spec(given["spec"]) if "spec" in given
                              else PLANTED)
    return given


def _run_one(spec: TableSpec, data_root: str | Path | None, loaded: dict[str, TextEmbedder],
             cache_dir: Path, progress: bool) -> list[str]:
    """1. check data files, 2. load embedders (once per name), 3. run the table's kind."""
    # Absolute, so the activation cache key (which includes the probe's path) does not
    # depend on the working directory.
    root = Path(data_root).resolve() if data_root is not None else None
    missing = [p for p in spec.data_files() if root is None or not (root / p).exists()]
    if missing:
        where = f"under {data_root}" if root is not None else "(no --data-root given)"
        raise NotRun(f"data {', '.join(missing)} {where}")
    try:  # every model the table loads is here (or downloadable) before any is loaded
        check(_model_needs(spec, [n for n in spec.embedders if n not in loaded]))
    except ModelsNotAvailable as e:
        raise NotRun(f"models not on this machine: {'; '.join(e.missing)}") from e
    for name in spec.embedders:
        if name not in loaded:
            try:
                loaded[name] = CachedEmbedder(create_embedder(name))
            except (OSError, ImportError) as e:
                raise NotRun(f"model: text embedder {name} ({_first_line(e)})") from e
    resolve = _resolver(root)
    try:
        return RUNNERS[spec.kind](spec, resolve, [loaded[n] for n in spec.embedders],
                                  cache_dir, progress)
    except (OSError, ImportError) as e:
        raise NotRun(f"model: {', '.join(spec.models)} ({_first_line(e)})") from e


def _model_needs(spec: TableSpec, embedders: list[str]) -> list[Need]:
    """What the table's kind loads: its target (weights for classifier search, only the
    code for class names) and the ``embedders`` not loaded yet."""
    if spec.kind == "classifier_search":
        return classifier_search_needs(spec.models[0], "DEFAULT", embedders)
    if spec.kind == "final_layer":
        return final_layer_needs(spec.models[0], embedders)
    return embedder_needs(embedders)


def _resolver(root: Path | None) -> Callable[[Any], Any]:
    def resolve(v: Any) -> Any:
        if isinstance(v, Mapping):
            return {k: resolve(x) for k, x in v.items()}
        return root / v
    return resolve


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _header(spec: TableSpec, out_dir: Path, data_root: str | Path | None,
            planted: Mapping[str, str] | None = None) -> list[str]:
    """The lines above a table's numbers; ``planted``: the ``--spec``/``--weights`` given
    (:func:`_planted_settings`), shown in both commands."""
    flags = "".join(f" --{k} {shlex.quote(v)}" for k, v in (planted or {}).items())
    cmd = f"dnd tables --only {spec.name}{flags}"
    if out_dir != Path("results"):
        cmd += f" --out {out_dir}"
    if data_root is not None:
        cmd += f" --data-root {data_root}"
    user_cmd = spec.command.replace("DATA", str(data_root) if data_root is not None else "DATA")
    user_cmd += flags
    data = [f"`{p}`" for p in spec.data_files()] or ["none (class names only)"]
    return [f"# {spec.name}", "", spec.title, "",
            f"Regenerate: `{cmd}`", "",
            f"- Models: {', '.join(spec.models)}",
            f"- Text embedders: {', '.join(spec.embedders)}",
            f"- Data (under the data root): {', '.join(data)}",
            f"- With your own descriptions: `{user_cmd}`", ""]


def _method_labels(spec: TableSpec, resolve: Callable[[Any], Any],
                   layer: str | None = None) -> tuple[str, list[UnitLabels]]:
    """(row name, labels): the model's class names, or the table's labels file."""
    if spec.options.get("labels") == "class_names":
        names = model_class_names(spec.models[0])
        return "class names", [UnitLabels(layer, i, (n,)) for i, n in enumerate(names)]
    return "labels file", read_labels(resolve(spec.data["labels"]),
                                      layer or spec.options.get("layer"), single_layer=True)


def _fmt(x: float) -> str:
    return f"{x:.4f}"


def _final_layer(spec: TableSpec, resolve, embedders, cache_dir, progress) -> list[str]:
    class_names = model_class_names(spec.models[0])
    method, labels = _method_labels(spec, resolve)
    sources = [(method, labels)] + [(f'constant "{b}" (baseline)',
                                     constant_labels([u.unit for u in labels], b))
                                    for b in spec.options.get("baselines", [])]
    rows = []
    for src, lab in sources:
        res = final_layer_similarity(lab, class_names, embedders)
        rows += [[src, s.embedder, _fmt(s.mean), f"[{_fmt(s.low)}, {_fmt(s.high)}]",
                  len(res.units)] for s in res.scores]
    return ["Mean cosine similarity of each unit's label to its class name (95% bootstrap CI "
            "over units, 1000 resamples, seed 0).", ""] + md_table(
       ["labels", "embedder", "mean cosine", "95% CI", "units"], rows)


def _classifier_search(spec: TableSpec, resolve, embedders, cache_dir, progress) -> list[str]:
    layer = spec.options["layer"]
    _, labels = _method_labels(spec, resolve, layer)
    probe = f"{spec.options['probe_kind']}:{resolve(spec.data['probe'])}"
    res = run_classifier_search(labels, spec.models[0], layer, probe, embedders, cache_dir,
                                progress=progress)
    rows = [[c, ", ".join(map(str, u)), "; ".join(dict.fromkeys(d)), _fmt(s), _fmt(a)]
            for c, u, d, s, a in zip(res.class_names, res.units, res.descriptions,
                                     res.similarity, res.per_class)]
    rows.append(["**mean**", "", "", "", f"**{_fmt(res.mean_auroc)}**"])
    return [f"One-vs-rest AUROC of the unit of layer `{layer}` whose description is closest "
            f"to each class name (text similarity: mean cosine over the embedders), scored by "
            f"its summary activation (spatial mean; fc outputs as they are) on "
            f"{res.n_images} images; tied units are averaged.", ""] + md_table(
       ["class", "unit(s)", "description", "text similarity", "AUROC"], rows)


def _milan_descriptions(labels: Any) -> dict[tuple[str, int], str]:
    """(layer, unit) -> description from a layer,unit,description file (a path) or from
    reference-layout files by layer (a mapping layer -> path)."""
    if isinstance(labels, Mapping):
        return {(layer, u.unit): u.description for layer, path in labels.items()
                for u in read_labels(path, layer)}
    return {(u.layer, u.unit): u.description for u in read_labels(labels)}


def _milan(spec: TableSpec, resolve, embedders, cache_dir, progress) -> list[str]:
    """Per-layer scores of the table's method (``data.labels``) and of any ``data.compare``
    methods, all on the units the method describes, beside the best constant label."""
    annotations = read_annotations(resolve(spec.data["annotations"]))
    method = spec.options.get("method", "DnD")
    descriptions = _milan_descriptions(resolve(spec.data["labels"]))
    others = {name: _milan_descriptions(v)
              for name, v in resolve(spec.data.get("compare", {})).items()}
    for name, d in others.items():
        lacking = sorted(set(descriptions) - set(d))
        if lacking:
            raise ValueError(f"table {spec.name}: {name} has no description for "
                             f"{len(lacking)} unit(s) of {method}, e.g. {lacking[:3]}")
    threshold = spec.options.get("threshold")
    lines = [f"Mean cosine similarity of a description to the unit's annotations, per layer, "
             f"over all units and over reliable units (two annotations agree); every method is "
             f"scored on the units {method} describes. The constant is the best of a fixed "
             f"list of generic labels on those units.", ""]
    for emb in embedders:
        results = [milan_scores(descriptions, annotations, emb, name=method,
                                threshold=threshold)]
        results += [milan_scores({k: d[k] for k in descriptions}, annotations, emb, name=name,
                                 threshold=threshold) for name, d in others.items()]
        lines += [f"Embedder {emb.name}: {len(results[0].units)} units. {results[0].rule}", ""]
        lines += md_table(MILAN_TABLE_HEADER, milan_table_rows(results)) + [""]
    return lines[:-1]


def _nth(n: int) -> str:
    """1st, 2nd, 3rd, 4th, ..., 11th, 12th, 13th, ..., 103rd."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _milan_reliability(spec: TableSpec, resolve, embedders, cache_dir, progress
                       ) -> list[str]:
    """Reliable units per layer at several thresholds on the units of ``data.labels``, the
    threshold that marks ``match_reliable`` of them (rank matching), and the reliable units
    of every annotated unit at the embedder's calibrated threshold."""
    annotations = read_annotations(resolve(spec.data["annotations"]))
    units = set(_milan_descriptions(resolve(spec.data["labels"])))
    layer_all = np.array([a.layer for a in annotations])
    in_subset = np.array([(a.layer, a.unit) in units for a in annotations])
    layer_of = layer_all[in_subset]
    target = int(spec.options["match_reliable"])
    lines = []
    for emb in embedders:
        best_all = best_pair_similarity(annotations, emb)
        best = best_all[in_subset]
        matched = round(matching_threshold(best, target), 4)
        ranked = np.sort(best)[::-1]
        calibrated = reliable_threshold(emb.name)
        thresholds = sorted({*map(float, spec.options["thresholds"]), matched,
                             *([calibrated] if calibrated is not None else [])}, reverse=True)

        def label(t: float, calibrated: float | None = calibrated,
                  matched: float = matched) -> str:
            return (f"{t:g}" + (" (calibrated)" if t == calibrated else "")
                    + (" (rank-matched)" if t == matched else ""))

        layers = sorted(set(layer_of), key=layer_sort_key)
        rows = [[label(t), *(str(int((best[layer_of == la] > t).sum())) for la in layers),
                 f"{int((best > t).sum())} of {len(best)}"] for t in thresholds]
        lines += [f"Embedder {emb.name}, on the {len(best)} units of the labels file(s): "
                  f"reliable units (best annotation pair's cosine > threshold) per layer. "
                  f"Rank matching: any threshold between the {_nth(target)} and {_nth(target + 1)} "
                  f"highest best-pair similarity ({ranked[target - 1]:.4f} and "
                  f"{ranked[target]:.4f}) marks exactly {target} units reliable; the midpoint "
                  f"is {matched:g}.", ""]
        lines += md_table(["threshold", *layers, "all"], rows) + [""]
        at = calibrated if calibrated is not None else matched
        lines += [f"Every annotated unit at {label(at)}:", ""]
        lines += md_table(["layer", "reliable", "units"],
                          [[la, str(int((best_all[layer_all == la] > at).sum())),
                            str(int((layer_all == la).sum()))]
                           for la in sorted(set(layer_all), key=layer_sort_key)]
                          + [["all", str(int((best_all > at).sum())), str(len(best_all))]])
        lines.append("")
    return lines[:-1]


def _toyworld_benchmark(spec: TableSpec, resolve, embedders, cache_dir, progress
                        ) -> list[str]:
    from dnd.benchmarks.toyworld import run_benchmark

    return run_benchmark(Path(cache_dir) / "toyworld-benchmark",
                         n_probe=int(spec.options.get("n_probe", 2000)), progress=progress)


_PLANTED_OPTIONS = {"n_probe", "free_units", "llm", "n_boot", "seed", "spec", "weights"}


def _planted_cache(cache_dir: Path, spec: str | None, weights: str) -> Path:
    """The benchmark's run folder: one per spec and weights file (its content hash), as a
    run folder refuses another config and must not resume runs of older weights."""
    from dnd.io import bytes_hash
    from dnd.toyworld.target import PLANTED_STEM

    name = "toyworld-planted"
    if spec:
        name += f"-{Path(spec).stem}"
    if weights != "DEFAULT":
        path = Path(weights)
        path = path / f"{PLANTED_STEM}.safetensors" if path.is_dir() else path
        name += f"-{bytes_hash(path.read_bytes())[:8]}"
    return cache_dir / name


def _free_units(value: Any) -> int | None:
    """The planted table's ``free_units`` option: a count, or ``all`` (None)."""
    if value == "all":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"toyworld_planted: free_units must be a count >= 0 or 'all', "
                         f"got {value!r}")
    return value


def _toyworld_planted(spec: TableSpec, resolve, embedders, cache_dir, progress) -> list[str]:
    from dnd.benchmarks.planted import run_planted_benchmark

    o = spec.options
    unknown = sorted(set(o) - _PLANTED_OPTIONS)
    if unknown:
        raise ValueError(f"table {spec.name}: unknown option(s) {', '.join(unknown)}; "
                         f"known: {', '.join(sorted(_PLANTED_OPTIONS))}")
    weights = str(o.get("weights", "DEFAULT"))
    return run_planted_benchmark(_planted_cache(Path(cache_dir), o.get("spec"), weights),
                                 n_probe=int(o.get("n_probe", 2000)),
                                 free_units=_free_units(o.get("free_units", 16)),
                                 llm=o.get("llm"),
                                 n_boot=int(o.get("n_boot", 2000)), seed=int(o.get("seed", 0)),
                                 weights=weights, spec=o.get("spec"), progress=progress)


# kind -> fn(spec, resolve, embedders, cache_dir, progress) -> markdown lines
RUNNERS: dict[str, Callable[..., list[str]]] = {
    "toyworld_benchmark": _toyworld_benchmark,
    "toyworld_planted": _toyworld_planted,
    "final_layer": _final_layer,
    "classifier_search": _classifier_search,
    "milan": _milan,
    "milan_reliability": _milan_reliability,
}
