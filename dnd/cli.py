"""Command line: ``dnd describe`` and helpers. ``main(argv)`` is callable from tests."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from dnd.backends.llm import LLMError
from dnd.config import STAGES, RunConfig, load_config, preset_names
from dnd.errors import ConfigError
from dnd.settings import CropConfig

log = logging.getLogger("dnd")

_D = RunConfig.__dataclass_fields__
_C = CropConfig()
# In a backend flag's help: replaced by its registry's names when help is printed.
_NAMES = "<registry names>"
_PROBE_FORMS = "<probe spec forms>"  # filled from dnd.probe.PROBE_SCHEMES when help is printed


def _default_backend(section: str) -> str:
    return _D[section].default_factory().name

# flag -> (config key, type, help). Flags default to None so a --config file's values are
# only overridden by flags actually given.
DESCRIBE_FLAGS: list[tuple[str, str, type, str]] = [
    ("--model", "model", str, "target network: a torchvision name (resnet50, vit_b_16, ...), "
     "timm:<name>, open_clip:<model>/<pretrained> (a CLIP image tower, e.g. "
     "open_clip:RN50x4/openai), efficientnet-lite0 or toyworld-cnn. `dnd models` lists them."),
    ("--weights", "weights", str, "DEFAULT (the model's pretrained weights), none (random "
     "init), a torchvision weights name, or a .safetensors/.pt state-dict path "
     f"(default {_D['weights'].default})"),
    ("--layer", "layer", str, "layer to describe, by module name (e.g. layer4, fc); "
     "`dnd layers --model M` lists them. Repeat to describe several layers in one run: one "
     "pass over the probing set, shared caches, --units for each layer, labels in "
     "labels-<layer>.csv. A pattern names several: 'layer?' is a ResNet's layer1-layer4, "
     "'encoder.layers.*' a ViT's blocks (* and ? stay within one dot-separated part)"),
    ("--units", "units", str, "units to describe: all, 7, 0-99 or 0,5,10-12 "
     f"(default {_D['units'].default})"),
    ("--summary", "summary", str, "how a unit's spatial map becomes one number per image: "
     f"mean or max (default {_D['summary'].default})"),
    ("--stop-after", "stop_after", str, f"last stage to run: {', '.join(STAGES)} "
     f"(default {_D['stop_after'].default})"),
    ("--batch-size", "batch_size", int, f"images per forward pass "
     f"(default {_D['batch_size'].default})"),
    ("--workers", "workers", int, "image-loading worker processes, 0 = in the main process "
     f"(default {_D['workers'].default})"),
    ("--device", "device", str, "auto, cpu, cuda, cuda:N or mps "
     f"(default {_D['device'].default})"),
    ("--chunk-units", "chunk_units", int, "units processed and saved together; bounds "
     f"memory and the work a crash can lose (default {_D['chunk_units'].default})"),
    ("--executor", "executor", str, "where the per-unit stages run: local (this process) or "
     "ray (actors of a Ray cluster, one per GPU, each with its own copy of the models; needs "
     'pip install "dnd[ray]"); records do not depend on it, so a run resumes with either '
     f"(default {_D['executor'].default})"),
    ("--ray-address", "ray_address", str, "with --executor ray: the Ray cluster to join, e.g. "
     "auto or ray://head:10001 (default: start one on this machine). On several machines "
     "the run directory and probing set must be on a filesystem every node mounts"),
    ("--ray-actors", "ray_actors", int, "with --executor ray: number of actors (default: one "
     "per GPU of the cluster; without GPUs one per two CPUs)"),
    ("--dictionary", "dictionary.kind", str, "describe dictionary features besides or "
     "instead of neurons: nmf (NMF factors of the layer's activations at positions of the "
     "probing set: the Building Blocks' neuron groups), sae (a TopK sparse autoencoder "
     "trained on them) or file (--dictionary-path). Name the layers <layer>.nmf, "
     "<layer>.sae or <layer>.dict (--layer conv4.nmf; --layer conv4 too describes its "
     "neurons in the same run); fitted dictionaries are saved in the run (default none)"),
    ("--dictionary-features", "dictionary.features", int, "features of an nmf or sae "
     "dictionary (default: nmf 32, sae 4x the layer's channels)"),
    ("--dictionary-k", "dictionary.k", int, "sae: latents active at each position (TopK; "
     "default 8)"),
    ("--dictionary-path", "dictionary.path", str, "file: a sparse autoencoder (a SAELens "
     "folder, a dictionary_learning ae.pt, a safetensors file with W_enc and b_enc) or a "
     "[features, channels] matrix of directions (.npy, .pt, .safetensors)"),
    ("--top-n", "crop.top_n", int, f"top probe images per unit (default {_C.top_n})"),
    ("--top-k", "crop.top_k", int, "top images captioned with their best crop (in_place), "
     f"or activating images kept after re-scoring originals and crops (rescored) (default "
     f"{_C.top_k})"),
    ("--max-crops", "crop.max_crops", int, "attention crops per top image, 0 = none "
     f"(default {_C.max_crops})"),
    ("--crop-score", "crop.score", str, "how a crop is scored: in_place (the unit's "
     "activation inside it on the original image; every top image is captioned with its "
     "best crop, so a small thing's crop is) or rescored (the paper: enlarged to the "
     f"input and re-scored; the top-K of originals and crops) (default {_C.score})"),
    ("--captioner", "captioner.name", str, f"image-to-text backend: {_NAMES} "
     f"(default {_default_backend('captioner')})"),
    ("--summarizer", "summarizer", str, "where candidate concepts come from: llm (Step 2 "
     "with the --llm backend), consensus (phrases the captions share, no LLM) or "
     "llm+consensus (the LLM's candidates joined by up to 3 shared phrases; best-concept "
     "selection decides) (default llm)"),
    ("--candidates", "candidates", str, "levels (the summariser's concepts, their parts, "
     "and the words and conjunctions of words the captions share, ranked by how many "
     "captions name them: attributes, objects and combinations) or phrases (the "
     f"summariser's concepts as they are: the paper) (default {_D['candidates'].default})"),
    ("--llm", "llm.name", str, f"chat backend for the summariser: {_NAMES} "
     f"(default {_default_backend('llm')}); switching backend drops the preset's options "
     "for the old one. Naming an LLM (--llm, --llm-model, --base-url) switches a preset's "
     "consensus summariser to llm; with --summarizer consensus it is an error"),
    ("--llm-model", "llm.options.model", str, "chat model name or path "
     "(default gpt-4o-mini for openai)"),
    ("--base-url", "llm.options.base_url", str, "OpenAI-compatible server URL, e.g. "
     "http://localhost:8000/v1 for vLLM (default: api.openai.com). The key is read from "
     "OPENAI_API_KEY, never from a flag"),
    ("--generator", "generator.name", str, f"text-to-image backend: {_NAMES} "
     f"(default {_default_backend('generator')})"),
    ("--steps", "generator.options.steps", int, "diffusion steps of the diffusers generator "
     "(default 50)"),
    ("--encoder", "encoder.name", str, f"image-text encoder for similarities: {_NAMES} "
     f"(default {_default_backend('encoder')})"),
    ("--images-per-concept", "score.images_per_concept", int, "images generated per "
     "candidate concept (default 10)"),
    ("--seed", "score.seed", int, "seed of generated image j of every concept is seed + j "
     "(default 0)"),
    ("--selection", "score.selection", str, "how Label 1 is chosen: evidence (the most "
     "general candidate whose generated images fire the unit, shown as large as the unit "
     "sees things, and whose activating images' captions name it: response x coverage) or "
     "paper (rank score x CLIP image-product weight) (default evidence)"),
    ("--screen-images", "score.screen_images", int, "adaptive best-concept selection: "
     "generate this many images per candidate first; a unit whose best candidate leads "
     "clearly on them is decided there, the others' best candidates get the rest "
     "(--contenders, --contender-margin; 0: every candidate gets all images, as in the "
     "paper; default 0; `dnd bench selection` measures the savings and the agreement)"),
    ("--contenders", "score.contenders", int, "candidates per unit that may get all their "
     "images after screening (with --screen-images; default 2)"),
    ("--contender-margin", "score.contender_margin", float, "with --screen-images: a "
     "candidate is close to the best when its screening final score is at least this "
     "fraction of the best's; a unit with none close is decided on its screening images, "
     "and only close ones among the --contenders best get all images (0: never decided "
     "early, all --contenders get them; default 0.7)"),
    ("--image-bank", "image_bank", str, "folder of generated images (and their embeddings) "
     "shared by every run on this machine, so a concept drawn once is never drawn again: "
     "auto ($DND_IMAGE_BANK, else $XDG_CACHE_HOME/dnd/image-bank, i.e. "
     "~/.cache/dnd/image-bank), none, or a folder (default auto)"),
    ("--image-bank-max-gb", "image_bank_max_gb", float, "size limit of the image bank; the "
     "least recently used images go first (default 20)"),
]


class _BackendNamesFormatter(argparse.HelpFormatter):
    """Puts the registries' backend names into the backend flags' help, only when help is
    printed: listing them loads every backend module and plug-in, which a run does later
    and only for the backends it uses."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = super()._get_help_string(action)
        if text and _NAMES in text:
            text = text.replace(_NAMES, _backend_choices(action.dest.split(".")[0]))
        if text and _PROBE_FORMS in text:
            from dnd.probe import spec_forms

            text = text.replace(_PROBE_FORMS, spec_forms())
        return text


def _backend_choices(section: str) -> str:
    """The names in the registry of config section ``section`` (captioner, llm, ...)."""
    from dnd.backends import registered
    from dnd.backends.factory import describe_choices

    caps, llms, gens, encs = registered()
    registry = {"captioner": caps, "llm": llms, "generator": gens, "encoder": encs}[section]
    return describe_choices(registry)


class _SubcommandParser(argparse.ArgumentParser):
    """A subcommand's parser that reports unknown arguments itself: argparse would hand them
    back to the top-level parser, which prints ``usage: dnd [-h] ...`` for
    ``dnd describe --nope`` instead of describe's usage. Nested subcommands inherit it."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras


def _add_verbosity(p: argparse.ArgumentParser, top: bool = False) -> None:
    """-q/--quiet and -v/--verbose. Below the top level they default to SUPPRESS, so
    ``dnd -v describe`` is not reset by describe's own defaults."""
    g = p.add_mutually_exclusive_group()
    default = {} if top else {"default": argparse.SUPPRESS}
    quiet = ("only warnings, errors and results: no INFO lines (describe and demo also drop "
             "their progress bars)" if top else "only warnings, errors and the final "
             "summary: no progress bars, no progress lines")
    g.add_argument("-q", "--quiet", action="store_true", **default, help=quiet)
    g.add_argument("-v", "--verbose", action="store_true", **default,
                   help="also the libraries' INFO messages and progress bars (open_clip, "
                   "transformers, huggingface_hub), which are hidden by default")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dnd", description="Describe-and-Dissect: plain-language descriptions of the "
        "units of vision networks. By default dnd prints its own progress, warnings from "
        "every library, and no library INFO messages or progress bars: -v adds those, -q "
        "keeps only warnings, errors and results.")
    _add_verbosity(p, top=True)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_SubcommandParser)
    from dnd.benchmarks.cli import add_cli as add_benchmark_cli
    from dnd.benchmarks.cli import add_tables_cli
    from dnd.evaluation.cli import add_cli

    add_tables_cli(sub)  # `dnd tables`
    add_cli(sub)  # `dnd evaluate ...`
    from dnd.report import add_cli as add_report_cli

    add_report_cli(sub)  # `dnd report RUN_DIR`
    _add_featurevis_cli(sub)  # `dnd featurevis RUN_DIR`
    from dnd.explain import add_cli as add_explain_cli

    add_explain_cli(sub)  # `dnd explain IMAGE --run RUN_DIR`

    d = sub.add_parser("describe", help="describe units of a layer",
                       formatter_class=_BackendNamesFormatter,
                       description="Describe units of a layer. Re-running the same command "
                       "continues where it stopped.")
    d.add_argument("--preset", choices=preset_names(), help="start from a shipped config: "
                   "paper (ResNet-50 layer4, BLIP, GPT, SD v1-5, CLIP ViT-B/16) or toyworld "
                   "(fully offline); --config and flags override it")
    d.add_argument("--config", help="YAML config file (keys as in a run's config.yaml); "
                   "flags given override its values")
    d.add_argument("--run-dir", required=True,
                   help="run directory for the config, activations, unit records and "
                   "labels.csv (created if absent; a re-run resumes)")
    d.add_argument("--probe", action="append", default=None, metavar="SPEC",
                   help="probing set; repeat to concatenate: " + _PROBE_FORMS + " (a folder "
                   "is read recursively; cifar10/cifar100 take the torchvision layout or .npz)")
    for flag, key, typ, help_ in DESCRIBE_FLAGS:
        d.add_argument(flag, dest=key, type=typ, default=None, help=help_,
                       action="append" if key == "layer" else "store")
    d.add_argument("--retry-failed", action="store_true",
                   help="redo units that failed in an earlier run (from the failed stage)")
    d.add_argument("--wait", action="store_true",
                   help="if another process is using the run directory, wait for it to "
                   "finish instead of failing at once")
    _add_verbosity(d)

    add_benchmark_cli(sub, _add_verbosity)  # `dnd demo`, `dnd bench ...`

    sub.add_parser("models", help="list the model names --model accepts")
    la = sub.add_parser("layers", help="list the layers of a model with their unit counts "
                        "(random weights, one forward pass)")
    la.add_argument("--model", required=True, help="model name, as for describe")
    return p


def _folder_images(folder: str) -> list:
    from dnd.probe import open_probe

    probe = open_probe(folder)
    return [probe.load(i) for i in range(len(probe))]


def _add_featurevis_cli(sub) -> None:
    """Register ``dnd featurevis RUN_DIR``: images (:mod:`dnd.featurevis`) and, for a CLIP
    run, texts (:mod:`dnd.textvis`), the two apps joined here."""
    from dnd.featurevis import FeatureVisConfig
    from dnd.textvis import add_cli_arguments

    p = sub.add_parser(
        "featurevis", help="feature visualizations of a run's units (shown by dnd report)",
        description="Optimise images that excite each described unit of a run (Fourier "
        "parameterisation in the probing set's colour basis, random rotation/zoom/"
        "translation), saved in RUN_DIR/featurevis/ and shown on the report's unit pages. "
        "For a CLIP target (toyworld-clip, open_clip:...) it also finds each unit's top texts. "
        "Re-running skips units already done with the same settings.")
    p.add_argument("run_dir", help="a run directory made by dnd describe")
    p.add_argument("--layer", help="the layer, for a run of several (default: the run's "
                   "layer)")
    p.add_argument("--units", help="units to visualise (e.g. 0-9; default: every unit "
                   "with a record)")
    d = FeatureVisConfig()
    p.add_argument("--per-unit", type=int, default=d.per_unit,
                   help=f"images per unit; more than 1 adds a diversity term so they differ "
                   f"(default {d.per_unit})")
    p.add_argument("--steps", type=int, default=d.steps,
                   help=f"optimisation steps (default {d.steps})")
    p.add_argument("--decay", type=float, default=d.decay,
                   help=f"spectrum scaling 1/f^decay of the image parameterisation: larger "
                   f"gives smoother images, smaller reaches fine detail such as text "
                   f"(default {d.decay})")
    p.add_argument("--alpha", action="store_true",
                   help="also optimise an opacity mask, composited over a random flat colour "
                   "each step, so only what the unit needs stays opaque (shown over the "
                   "probing images' mean colour); off by default: on the toy world it reads "
                   "better for class units and worse for hidden ones "
                   "(results/featurevis-toyworld.md)")
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed (default {d.seed})")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help=f"images optimised together (default {d.batch_size})")
    p.add_argument("--device", help="cpu, cuda, cuda:N, mps (default: the run's device)")
    p.add_argument("--facet", metavar="NAME", help="faceted visualization: a linear probe "
                   "NAME trained on --facet-layer to tell --facet-positive images from "
                   "--facet-negative ones steers the images (needs all three)")
    p.add_argument("--facet-layer", help="the earlier layer the facet probe reads")
    p.add_argument("--facet-positive", metavar="FOLDER", help="images of the facet")
    p.add_argument("--facet-negative", metavar="FOLDER", help="images without it")
    p.add_argument("--facet-weight", type=float, default=1.0,
                   help="weight of the facet term (default 1.0)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_cli_arguments(p)
    p.set_defaults(func=_featurevis)


def _featurevis(args) -> int:
    from dnd import featurevis
    from dnd.store import RunStore
    from dnd.textvis import run_cli

    facet_args = (args.facet_layer, args.facet_positive, args.facet_negative)
    if (args.facet is None) != all(a is None for a in facet_args) or (
            args.facet is not None and None in facet_args):
        raise ValueError("dnd featurevis: --facet needs --facet-layer, --facet-positive and "
                         "--facet-negative (and they need --facet)")
    facet = None
    if args.facet is not None:
        facet = (args.facet, args.facet_layer, _folder_images(args.facet_positive),
                 _folder_images(args.facet_negative), args.facet_weight)
    cfg = featurevis.FeatureVisConfig(steps=args.steps, per_unit=args.per_unit,
                                      seed=args.seed, batch_size=args.batch_size,
                                      decay=args.decay, alpha=args.alpha)
    out = featurevis.featurevis_run(args.run_dir, args.units, cfg, layer=args.layer,
                                    facet_images=facet, device=args.device,
                                    progress=not args.quiet)
    texts = run_cli(args, RunStore(args.run_dir).load_config().model)
    if not args.quiet:
        print(f"{out['done']} unit(s) visualised, {out['skipped']} already done, in "
              f"{out['folder']} ({out['seconds']:.0f} s)")
        if texts is not None:
            print(f"top texts: {texts['done']} unit(s) done, {texts['skipped']} already "
                  f"done, in {texts['folder']} ({texts['seconds']:.0f} s)")
        print(f"`dnd report {args.run_dir}` shows them")
    return 0


def _layers_listing(target) -> str:
    """``dnd layers``: one line per layer, its name, unit count ("-": none to describe) and
    where its units are (the axis of a 4-D output and what says so), from one forward pass
    of a blank image."""
    from dnd.target import layer_infos

    infos = layer_infos(target)
    width = max((len(i.name) for i in infos), default=0)
    return "\n".join(f"{i.name:<{width}}  {'-' if i.units is None else i.units:>6}  {i.note}"
                     for i in infos)


def _describe(args: argparse.Namespace) -> int:
    from dnd.api import describe

    overrides = {key: getattr(args, key) for _, key, _, _ in DESCRIBE_FLAGS
                 if getattr(args, key) is not None}
    if args.probe:
        overrides["probe"] = args.probe
    config = load_config(args.config, overrides, preset=args.preset)
    result = describe(config, args.run_dir, progress=not args.quiet,
                      retry_failed=args.retry_failed, wait=args.wait)
    lines = []
    for layer, res in result.layers.items():  # one line per layer
        line = (f"{len(res.units)} unit(s) of {layer}: {len(res.done_now)} done now, "
                f"{len(res.already_done)} already done, {len(res.failed)} failed")
        if res.failed_before:
            line += (f" ({len(res.failed_before)} in an earlier run, left alone: "
                     "--retry-failed redoes them)")
        if config.stop_after == "activations":
            line = f"activations of {res.activations.n_units} units of {layer}"
        lines.append(line)
    msg = "\n".join(lines)
    if result.n_unreadable:
        msg += f"; {result.n_unreadable} unreadable image(s) skipped"
    print(f"{msg}. Run directory: {result.run_dir}")
    failed = [(layer, u, why) for layer, res in result.layers.items()
              for u, why in res.failed.items()]
    if failed:
        layer, unit, why = failed[0]
        where = f"unit {unit}" + (f" of {layer}" if len(result.layers) > 1 else "")
        print(f"{len(failed)} unit(s) failed, e.g. {where}: {why}", file=sys.stderr)
        return 1
    return 0


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each message (tests swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ assigns it; always sys.stderr here
        pass


def _dnd_or_warning(record: logging.LogRecord) -> bool:
    """Default filter: dnd's own messages, and other loggers' only from WARNING up (open_clip
    logs INFO lines through the root logger, transformers through its own)."""
    return (record.levelno >= logging.WARNING or record.name == "dnd"
            or record.name.startswith("dnd."))


def setup_logging(verbosity: int) -> None:
    """Console output of the ``dnd`` command. ``verbosity``: -1 (-q), 0 (default), 1 (-v).

    - default: dnd's INFO progress lines and progress bars, every library's WARNING and
      above (a library warning, such as weights that failed to load, can concern the
      user), no library INFO lines and no library progress bars ("Loading weights");
    - -q: WARNING and above from everyone, no progress bars (dnd's are turned off by
      the commands' ``progress=False``);
    - -v: INFO from every logger, library progress bars, and transformers/diffusers INFO
      (unless TRANSFORMERS_VERBOSITY / DIFFUSERS_VERBOSITY say otherwise).

    Python's ``warnings`` are left to their defaults.
    """
    root = logging.getLogger()
    for h in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(h)  # main() called again in one process (tests)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.WARNING if verbosity < 0 else logging.INFO)
    if verbosity == 0:
        handler.addFilter(_dnd_or_warning)
    root.addHandler(handler)
    # dnd's INFO reaches the handler whatever the root level; libraries' INFO records are
    # not even created unless -v lowers the root level.
    logging.getLogger("dnd").setLevel(logging.INFO)
    if verbosity > 0 and root.getEffectiveLevel() > logging.INFO:
        root.setLevel(logging.INFO)
    _library_output(verbose=verbosity > 0)


def _library_output(verbose: bool) -> None:
    """Hugging Face progress bars only with -v; transformers/diffusers INFO with -v.

    transformers reads huggingface_hub's switch when it is imported, so turning it off here,
    before any backend imports transformers, also silences its "Loading weights" bar; if
    transformers is already imported (a test, a notebook) its own switch is set too.
    """
    try:
        from huggingface_hub import constants
        from huggingface_hub.utils import disable_progress_bars, enable_progress_bars
    except ImportError:
        return
    bars = verbose and constants.HF_HUB_DISABLE_PROGRESS_BARS is not True  # env var wins
    (enable_progress_bars if bars else disable_progress_bars)()
    tf = sys.modules.get("transformers.utils.logging")
    if tf is not None and tf.is_progress_bar_enabled() != bars:
        (tf.enable_progress_bar if bars else tf.disable_progress_bar)()
    for lib in ("transformers", "diffusers") if verbose else ():
        if os.environ.get(f"{lib.upper()}_VERBOSITY"):
            continue  # the user's own setting wins
        lib_logging = sys.modules.get(f"{lib}.utils.logging")
        if lib_logging is not None:
            lib_logging.set_verbosity_info()
        else:  # read when the library is first imported
            os.environ[f"{lib.upper()}_VERBOSITY"] = "info"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dnd`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "quiet", False) and getattr(args, "verbose", False):
        parser.error("-q/--quiet and -v/--verbose exclude each other")
    args.quiet = bool(getattr(args, "quiet", False))
    args.verbose = bool(getattr(args, "verbose", False))
    setup_logging(-1 if args.quiet else 1 if args.verbose else 0)
    try:
        if hasattr(args, "func"):  # subcommands that carry their own handler
            return args.func(args)
        if args.command == "describe":
            return _describe(args)
        from dnd.target import load_target, model_names

        if args.command == "models":
            print("\n".join(model_names() + ["timm:<any timm model name>",
                                              "open_clip:<model>/<pretrained>"]))
        elif args.command == "layers":
            print(_layers_listing(load_target(args.model, weights="none")))
        return 0
    except (ConfigError, ValueError, KeyError, OSError, ImportError, LLMError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"dnd: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
