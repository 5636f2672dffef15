"""Two processes computing the same activations into a shared cache directory (`dnd tables`
and `dnd evaluate` share runs/eval-cache): one computes, the other waits and reuses it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent

SHARER = """
import sys, time
from pathlib import Path
import numpy as np
sys.path.insert(0, sys.argv[5])
from conftest import colour_target
from dnd.activations import compute_activations
from dnd.probe import open_probe

probe, cache, out, role = sys.argv[1:5]
sync = Path(cache).parent
target = colour_target()
forward, calls = target.module.forward, [0]

def slow(x):  # 10 batches of 2; the second process starts its pass at the first's 8th
    calls[0] += 1
    if role == "first" and calls[0] == 8:
        (sync / "go").touch()
        while not (sync / "ready").exists():
            time.sleep(0.05)
    time.sleep(0.3)
    return forward(x)

target.module.forward = slow
if role == "second":
    (sync / "ready").touch()
    while not (sync / "go").exists():
        time.sleep(0.05)
acts = compute_activations(target, open_probe(probe), ["pool"], cache, batch_size=2,
                           progress=False)["pool"]
np.save(out, np.asarray(acts.values, dtype=np.float32))
"""


@pytest.mark.faults
def test_processes_sharing_an_activation_cache_get_the_same_numbers(colour_probe, tmp_path):
    """`dnd tables` and `dnd evaluate` may share runs/eval-cache: a second process that
    computes an entry the first is still writing must not zero the first's rows."""
    folder, _, _ = colour_probe
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

    def start(cache, role):
        return subprocess.Popen([sys.executable, "-c", SHARER, str(folder), str(cache),
                                 str(tmp_path / f"{role}.npy"), role, str(HERE)], env=env)

    assert start(tmp_path / "alone" / "cache", "alone").wait(timeout=300) == 0
    (tmp_path / "shared").mkdir()  # where the two processes signal each other
    procs = [start(tmp_path / "shared" / "cache", r) for r in ("first", "second")]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    alone = np.load(tmp_path / "alone.npy")
    assert (alone != 0).any(axis=1).sum() >= 7  # red/green images: rows that must not be 0
    for role in ("first", "second"):
        np.testing.assert_array_equal(np.load(tmp_path / f"{role}.npy"), alone)
