"""Plug-ins (dnd/plugins.py): entry points in group ``dnd.plugins`` fill the registries on
their first lookup; a broken one warns, leaves the rest working and explains the names it
would have provided. Also: probing-set specs with a registered scheme, and paths with ':'.

The fake plug-ins are modules written to a temporary folder; the loader's entry-point source
(``plugins._entry_points``) is replaced, and the registries and loader state are restored
after each test.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap
import warnings
from importlib.metadata import EntryPoint

import numpy as np
import pytest
import torch
from PIL import Image

from dnd import plugins
from dnd.probe import PROBE_SCHEMES, FolderProbe, ProbeError, open_probe
from dnd.target import TARGETS, load_target

# Registers a target and a probing scheme; looks a name up while plug-ins load (the loader
# must not recurse), and counts its calls (it must run once).
FAKE_PARTS = '''
import numpy as np
from torch import nn

from dnd.probe import ArrayProbe, probe_scheme
from dnd.target import TARGETS, Preprocess, Target

CALLS = []


def _register():
    CALLS.append(1)
    assert "fake-cnn" not in TARGETS  # a lookup during loading

    @TARGETS.register("fake-cnn")
    def _fake_cnn(weights="DEFAULT"):
        module = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
        return Target(name="fake-cnn", module=module.eval(), weights_id=f"fake.{weights}",
                      preprocess=Preprocess(resize=8, crop=8, mean=(0.5,) * 3, std=(0.5,) * 3))

    @probe_scheme("fakeset", usage="fakeset:N")
    def _fakeset(arg):
        n = int(arg)
        images = np.full((n, 8, 8, 3), 7, np.uint8)
        return ArrayProbe(name=f"fakeset:{n}", ids=[f"fake/{i}" for i in range(n)],
                          images=images, source="fakeset")
'''

# The three ways an entry point can name a plug-in: (module tail, entry-point value).
FORMS = {
    "module registering on import": ("_register()\n", "{mod}"),
    "module with register()": ("register = _register\n", "{mod}"),
    "function": ("", "{mod}:_register"),
}


@pytest.fixture
def fake_plugins(monkeypatch, tmp_path):
    """``install(name=source_or_value, ...)``: entry points for these plug-ins only. A value
    that is a module's source is written as module ``fake_<name>``; a plain string is used
    as the entry point's value as it is."""
    plugins.load_plugins()  # the real plug-ins, into the registries restored afterwards
    monkeypatch.setattr(plugins, "_STATE", plugins._State())
    for registry in (TARGETS, PROBE_SCHEMES):
        monkeypatch.setattr(registry, "_factories", dict(registry._factories))
    monkeypatch.syspath_prepend(str(tmp_path))
    written = []

    def install(**entries: tuple[str, str] | str) -> None:
        eps = []
        for name, entry in entries.items():
            if isinstance(entry, tuple):  # (source, value pattern)
                source, value = entry
                mod = f"fake_{name}"
                (tmp_path / f"{mod}.py").write_text(source)
                written.append(mod)
                entry = value.format(mod=mod)
            eps.append(EntryPoint(name=name, value=entry, group=plugins.GROUP))
        importlib.invalidate_caches()
        monkeypatch.setattr(plugins, "_entry_points", lambda: eps)

    yield install
    for mod in written:
        sys.modules.pop(mod, None)


@pytest.mark.parametrize("form", FORMS)
def test_a_plugin_registers_a_target_and_a_probe_scheme_on_first_lookup(fake_plugins, form):
    tail, value = FORMS[form]
    fake_plugins(good=(FAKE_PARTS + tail, value))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no plug-in warning
        target = load_target("fake-cnn", weights="none")  # no explicit loading call
        probe = open_probe(["fakeset:2", "fakeset:3"])
    assert target.weights_id == "fake.none"
    x = target.preprocess(probe.load(4)).unsqueeze(0)
    assert x.shape == (1, 3, 8, 8)
    assert torch.allclose(x, torch.full_like(x, (7 / 255 - 0.5) / 0.5))  # its own mean/std
    assert target.module(x).shape == (1, 4, 6, 6)
    assert len(probe) == 5 and probe.ids[0] == "0:fake/0" and probe.ids[-1] == "1:fake/2"
    assert "fakeset" in PROBE_SCHEMES.names() and "fake-cnn" in TARGETS.names()
    assert sys.modules["fake_good"].CALLS == [1]  # loaded once, however many lookups
    assert plugins.failures() == {}
    with pytest.raises(KeyError) as info:
        load_target("fake-cnm")
    assert "did you mean: fake-cnn" in str(info.value) and "Plug-ins" not in str(info.value)


def test_a_broken_plugin_warns_and_the_names_it_may_provide_fail_with_its_reason(fake_plugins):
    original = TARGETS._factories["efficientnet-lite0"]  # not get(): it would load plug-ins
    fake_plugins(
        missing="dnd_no_such_plugin_module",
        raises=("raise RuntimeError('needs the frobnicator library')\n", "{mod}"),
        good=(FAKE_PARTS + "_register()\n", "{mod}"),
        twice=("from dnd.target import TARGETS\n"
               "TARGETS.register('efficientnet-lite0')(lambda weights='DEFAULT': None)\n",
               "{mod}"),
        neither=("register = 3\n", "{mod}"),
    )
    with pytest.warns(plugins.PluginWarning) as record:
        names = TARGETS.names()  # any lookup loads the plug-ins
    messages = [str(w.message) for w in record]
    assert len(messages) == 4, messages
    assert "'missing' (dnd_no_such_plugin_module)" in messages[0]
    assert "ModuleNotFoundError: No module named 'dnd_no_such_plugin_module'" in messages[0]
    assert "'raises'" in messages[1] and "RuntimeError: needs the frobnicator" in messages[1]
    assert "'twice'" in messages[2] and "'efficientnet-lite0' is already registered" in messages[2]
    assert "'neither'" in messages[3]
    assert "fake_neither.register is of type 'int', not a function" in messages[3]
    # The others still work, and no plug-in replaced a registered part.
    assert "fake-cnn" in names and len(open_probe("fakeset:2")) == 2
    assert TARGETS.get("efficientnet-lite0") is original
    # Warned once: later lookups are quiet.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "frob-net" not in TARGETS
    # A name none of the loaded parts provides: the error gives the failures' reasons.
    with pytest.raises(KeyError) as info:
        load_target("frob-net")
    assert "unknown model 'frob-net'" in str(info.value)
    assert "'raises' (RuntimeError: needs the frobnicator library)" in str(info.value)
    with pytest.raises(ProbeError, match=r"not found: 'frobset:3' \(expected .*fakeset:N.*\) "
                       r"Plug-ins that failed.*'raises' \(RuntimeError: needs the frobnicator"):
        open_probe("frobset:3")


def test_a_colon_makes_a_scheme_only_when_the_scheme_is_registered(tmp_path, monkeypatch):
    """Folders whose names hold ':' (a drive letter, a timestamp) stay folders."""
    monkeypatch.chdir(tmp_path)
    for folder in ("photos:2024", "C:/images"):
        (tmp_path / folder).mkdir(parents=True)
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / folder / "a.png")
        probe = open_probe(folder)
        assert isinstance(probe, FolderProbe) and probe.ids == ["a.png"], folder
    with pytest.raises(ProbeError, match=r"probing set not found: 'photos:2025' \(expected a "
                       r"folder of images, PATH.npz, cifar10:PATH, cifar100:PATH"):
        open_probe("photos:2025")
    with pytest.raises(ProbeError, match="cifar10 probing set not found: nowhere"):
        open_probe("cifar10:nowhere")  # a registered scheme: its own message


def test_the_toy_world_is_a_plugin_the_registries_load_on_first_lookup():
    """In a fresh interpreter: importing the core loads nothing of the toy world; the first
    lookup loads it through the installed entry point (pyproject.toml)."""
    code = textwrap.dedent("""
        import sys
        from dnd.backends import registered
        from dnd.probe import open_probe
        from dnd.target import load_target
        early = [m for m in sys.modules if m.startswith("dnd.toyworld")]
        assert not early, early
        probe = open_probe("toyworld:2")
        print(type(probe).__module__, len(probe), probe.load(1).size)
        print(load_target("toyworld-cnn", weights="none").name)
        print(*["toyworld" in r.names() for r in registered()])
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:] + (
        "\n(no toyworld entry point? re-install: pip install --no-deps -e .)")
    assert out.stdout.splitlines() == ["dnd.toyworld.probe 2 (64, 64)", "toyworld-cnn",
                                       "True False True True"]
