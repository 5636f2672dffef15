"""What the ``dnd`` command prints: its own progress and summary by default, library
chatter (open_clip's root-logger INFO lines, transformers' "Loading weights" bar) only with
-v, nothing but warnings with -q; subcommands' own usage on bad flags; error wording."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from dnd.cli import main


@pytest.fixture
def cli_logging(monkeypatch, caplog):
    """Root at INFO (as a library or a user's own setup may leave it), so only dnd's
    handler and filter decide what is printed; undo what main() set up afterwards."""
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

    caplog.set_level(logging.INFO)
    for var in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):  # -v sets these if unset
        monkeypatch.setenv(var, "warning")
    bars_off = are_progress_bars_disabled()
    root = logging.getLogger()
    before = list(root.handlers)
    yield
    for h in [h for h in root.handlers if h not in before]:
        root.removeHandler(h)
    (disable_progress_bars if bars_off else enable_progress_bars)()
    tf = sys.modules.get("transformers.utils.logging")
    if tf is not None:
        tf.set_verbosity_warning()
        (tf.disable_progress_bar if bars_off else tf.enable_progress_bar)()


def _chatter():
    """One line of each kind a describe run produces."""
    logging.getLogger().info("Parsing model identifier. Schema: local-dir")  # open_clip
    logging.getLogger("dnd.pipeline").info("crops: 3 unit(s)")
    logging.getLogger("some.library").info("library detail")
    logging.getLogger("some.library").warning("library warning")


@pytest.mark.parametrize("flags,shown,hidden", [
    ([], ["INFO dnd.pipeline: crops: 3 unit(s)", "WARNING some.library: library warning"],
     ["Parsing model identifier", "library detail"]),
    (["-q"], ["WARNING some.library: library warning"],
     ["crops: 3 unit(s)", "Parsing model identifier", "library detail"]),
    (["-v"], ["INFO dnd.pipeline: crops", "INFO root: Parsing model identifier",
              "INFO some.library: library detail", "library warning"], []),
])
def test_verbosity_decides_what_is_printed(cli_logging, capsys, flags, shown, hidden):
    from huggingface_hub.utils import are_progress_bars_disabled

    assert main([*flags, "models"]) == 0
    capsys.readouterr()
    _chatter()
    err = capsys.readouterr().err
    for text in shown:
        assert text in err
    for text in hidden:
        assert text not in err
    # Hugging Face progress bars ("Loading weights") only with -v.
    assert are_progress_bars_disabled() == (flags != ["-v"])


def test_verbosity_flags_after_the_subcommand(cli_logging, capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = capsys.readouterr().out
    assert "-v, --verbose" in text and "-q, --quiet" in text
    with pytest.raises(SystemExit) as e:
        main(["describe", "-q", "-v", "--run-dir", "x"])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["-q", "describe", "-v", "--run-dir", "x"])
    assert "exclude each other" in capsys.readouterr().err


@pytest.mark.parametrize("argv,usage", [
    (["describe", "--run-dir", "r", "--nope"], "usage: dnd describe"),
    (["bench", "describe", "--nope"], "usage: dnd bench describe"),
    (["report", "somewhere", "--nope"], "usage: dnd report"),
])
def test_unknown_flag_prints_the_subcommands_usage(capsys, argv, usage):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(usage), err
    assert "unrecognized arguments: --nope" in err


def test_unknown_layer_message_has_a_separator():
    from conftest import colour_target

    from dnd.registry import unknown_name_message

    assert unknown_name_message("layer", "nope", ["conv1", "fc"]) == (
        "unknown layer 'nope'. Valid layers: conv1, fc")
    assert unknown_name_message("layer", "fcc", ["conv1", "fc"]).startswith(
        "unknown layer 'fcc'; did you mean: fc? Valid layers:")
    with pytest.raises(ValueError, match=r"unknown layer 'nope'\. Valid layers: detect"):
        colour_target().layer("nope")


def test_help_dnd_points_to_the_entry_points():
    import pydoc

    import dnd
    import dnd.api
    import dnd.config
    import dnd.target

    text = pydoc.render_doc(dnd, renderer=pydoc.plaintext)
    for name, obj in (("dnd.api.describe", dnd.api.describe),
                      ("dnd.config.load_config", dnd.config.load_config),
                      ("dnd.target.Target", dnd.target.Target)):
        assert name in text and callable(obj)


@pytest.mark.slow
def test_describe_prints_dnd_progress_without_library_chatter(tmp_path):
    """A real toy-world run in a fresh process: it loads the toy BLIP (transformers) and the
    toy CLIP (open_clip), whose INFO lines and progress bars must not reach the user.
    Slow: 30-60 s on 2 CPU cores, mostly imports; the tests above cover the same rules
    in-process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for var in ("TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS"):
        env.pop(var, None)
    r = subprocess.run(
        [sys.executable, "-m", "dnd.cli", "describe", "--preset", "toyworld", "--layer", "fc",
         "--units", "0", "--probe", "toyworld:40", "--run-dir", str(tmp_path / "run")],
        capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "1 unit(s) of fc: 1 done now" in r.stdout
    assert "INFO dnd.pipeline: labels: 1 unit(s)" in r.stderr
    for chatter in ("Parsing model identifier", "INFO root", "Loading weights"):
        assert chatter not in r.stderr, r.stderr
