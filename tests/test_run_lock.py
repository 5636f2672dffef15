"""One process per run directory (dnd.store.RunLock).

A second ``dnd describe`` on a run directory in use fails at once naming the holder, or
waits for it with ``--wait``; a killed holder (even one whose forked workers live on) leaves
no stuck lock. The process tests run the real CLI in subprocesses on the hand-weighted
colour network; the first process is held inside its activation pass until the test lets
it go. Run as a script, this file is that subprocess (see ``_child``).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from conftest import colour_target

from dnd.api import describe
from dnd.config import RunConfig
from dnd.io import FileLock
from dnd.store import LOCK_NAME, RunDirBusy, RunLock

HERE = Path(__file__).resolve().parent
START_S = 300  # a cold subprocess imports torch and dnd: slow on a busy 2-core machine


def _child(run_dir: str, probe: str, gate: str, *flags: str) -> int:
    """``dnd describe`` of units 0-2 of the colour net up to crops. With a ``gate`` folder
    the first forward pass touches ``gate/entered`` and blocks until ``gate/release``."""
    import dnd.loading as loading
    from dnd.cli import main

    def load_target(name, weights):
        target = colour_target()
        if gate:
            forward = target.module.forward

            def gated(x):
                Path(gate, "entered").touch()
                while not Path(gate, "release").exists():
                    time.sleep(0.05)
                return forward(x)

            target.module.forward = gated
        return target

    loading.load_target = load_target
    argv = ["describe", "--model", "colournet", "--layer", "pool", "--probe", probe,
            "--units", "0-2", "--stop-after", "crops", "--run-dir", run_dir, "-q", *flags]
    sys.argv = ["dnd", *argv]  # as the `dnd` command sees it (the lock records it)
    return main(argv)


def _spawn(tmp_path, name, run_dir, probe, gate="", *flags):
    """Start ``_child`` in a subprocess; its stdout/stderr go to ``tmp_path/name.out|err``."""
    out, err = open(tmp_path / f"{name}.out", "w"), open(tmp_path / f"{name}.err", "w")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, __file__, str(run_dir), str(probe), str(gate),
                             *flags], stdout=out, stderr=err, env=env, cwd=HERE.parent)


def _until(cond, proc, what, timeout=START_S):
    deadline = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, f"{what}: the process ended first (exit {proc.returncode})"
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.1)


@pytest.mark.faults
def test_second_describe_fails_at_once_naming_the_holder_and_wait_waits(colour_probe,
                                                                       tmp_path):
    folder, _, _ = colour_probe
    run, gate = tmp_path / "run", tmp_path / "gate"
    gate.mkdir()
    first = _spawn(tmp_path, "first", run, folder, gate)
    third = None
    try:
        _until(lambda: (gate / "entered").exists(), first, "first run's activation pass")
        # A second run on the same directory fails at once and names the first.
        second = _spawn(tmp_path, "second", run, folder)
        assert second.wait(timeout=START_S) == 2
        err = (tmp_path / "second.err").read_text()
        assert (f"run directory {run} is in use by pid {first.pid} on host "
                f"{socket.gethostname()} since ") in err, err
        assert "(dnd describe --model colournet --layer pool" in err and "pass --wait" in err, err
        assert first.poll() is None and not (run / "units").exists()
        # With --wait it waits (and says for whom), then resumes the finished run.
        third = _spawn(tmp_path, "third", run, folder, "", "--wait")
        _until(lambda: "waiting for it to finish" in (tmp_path / "third.err").read_text(),
               third, "--wait's message")
        assert f"pid {first.pid}" in (tmp_path / "third.err").read_text()
        time.sleep(1.0)
        assert third.poll() is None, "--wait did not wait"
        (gate / "release").touch()
        assert first.wait(timeout=START_S) == 0, (tmp_path / "first.err").read_text()
        assert third.wait(timeout=START_S) == 0, (tmp_path / "third.err").read_text()
    finally:
        (gate / "release").touch()
        for p in (first, third):
            if p is not None and p.poll() is None:
                p.kill()
    assert "3 done now, 0 already done" in (tmp_path / "first.out").read_text()
    assert "0 done now, 3 already done" in (tmp_path / "third.out").read_text()
    assert sorted(p.name for p in (run / "units" / "pool").iterdir()) == [
        "0.json", "1.json", "2.json"]
    assert (run / LOCK_NAME).read_text() == ""  # released: no holder named any more


HOLDER = """
import os, sys, time
from dnd.store import RunLock
RunLock(sys.argv[1]).__enter__()
child = os.fork()  # like a DataLoader worker: shares the parent's open files
if child == 0:
    time.sleep(600)
    os._exit(0)
print(child, flush=True)
time.sleep(600)
"""


@pytest.mark.faults
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_killed_holder_leaves_no_stuck_lock_even_with_forked_workers_alive(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], cwd=HERE.parent,
                              stdout=subprocess.PIPE, text=True)
    worker = None
    try:
        worker = int(holder.stdout.readline())
        with pytest.raises(RunDirBusy, match=f"in use by pid {holder.pid} on host "):
            RunLock(run).__enter__()
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
        os.kill(worker, 0)  # the forked worker still lives...
        with RunLock(run):  # ...and the lock is free at once
            assert str(os.getpid()) in (run / LOCK_NAME).read_text()
    finally:
        if holder.poll() is None:
            holder.kill()
        if worker:
            os.kill(worker, signal.SIGKILL)


def test_lock_names_its_holder_and_cleans_up_what_it_created(tmp_path):
    run = tmp_path / "run"
    with RunLock(run):
        assert run.is_dir()
        with pytest.raises(RunDirBusy) as busy:  # a second lock, even in one process
            RunLock(run).__enter__()
        msg = str(busy.value)
        assert f"run directory {run} is in use by pid {os.getpid()} on host " in msg
        assert re.search(r" since \d\d:\d\d \(", msg), msg  # today: the time only
        assert msg.endswith("wait for it, stop it, or pass --wait (wait=True in Python)")
    assert not run.exists()  # created by the lock, nothing written: removed again
    with RunLock(run):
        (run / "config.yaml").write_text("x: 1\n")
    assert (run / "config.yaml").exists() and (run / LOCK_NAME).read_text() == ""
    # A holder that started yesterday is named with the date; long commands are cut.
    yesterday = datetime.now().astimezone() - timedelta(days=1)
    info = {"pid": 4321, "host": "gpu7", "command": "dnd describe " + "x" * 300,
            "started": yesterday.isoformat()}
    with FileLock(run / LOCK_NAME, info), pytest.raises(RunDirBusy) as busy:
        RunLock(run).__enter__()
    assert (f"in use by pid 4321 on host gpu7 since {yesterday:%Y-%m-%d %H:%M} "
            "(dnd describe xxx") in str(busy.value)
    assert f"({info['command'][:197]}...); wait" in str(busy.value)  # 200 characters at most


def test_describe_refuses_a_held_run_dir_before_any_work_or_waits_for_it(colour_probe,
                                                                        tmp_path):
    from test_pipeline import CountingProbe

    from dnd.probe import open_probe

    folder, _, _ = colour_probe
    config = RunConfig.from_dict({"model": "colournet", "layer": "pool", "probe": [str(folder)],
                                  "units": "0", "stop_after": "crops"})
    run = tmp_path / "run"
    probe = CountingProbe(open_probe(str(folder)))
    lock = RunLock(run).__enter__()
    with pytest.raises(RunDirBusy, match="is in use by pid"):
        describe(config, run, target=colour_target(), probe=probe, progress=False)
    assert probe.loads == 0 and sorted(p.name for p in run.iterdir()) == [LOCK_NAME]
    # wait=True: proceeds once the holder lets go.
    threading.Timer(1.0, lock.__exit__, (None, None, None)).start()
    started = time.monotonic()
    res = describe(config, run, target=colour_target(), probe=probe, progress=False, wait=True)
    assert time.monotonic() - started >= 0.9 and res.done_now == [0]


if __name__ == "__main__":
    sys.exit(_child(*sys.argv[1:4], *sys.argv[4:]))
