"""The Ray executor (`dnd describe --executor ray`) on a local two-CPU Ray cluster with the
toy world: records byte-identical to the local executor's, an actor killed mid-run replaced
with every unit written exactly once, and runs that resume across executors.

Records are compared field by field, floats to 7 significant digits. The same arithmetic
gives the same bytes, but two things change the last digits of a score: the thread count
(Ray gives each CPU actor one thread, so the local reference runs with one torch thread
too), and which batch a generated image shared by two units is embedded in, which depends
on which actor draws it first (the local executor's chunk size has the same effect)."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch

from dnd.config import ConfigError, RunConfig, load_config
from dnd.pipeline import describe
from dnd.store import RunStore

ray = pytest.importorskip("ray")

N_UNITS = 8


def _config(**kw) -> RunConfig:
    return load_config(preset="toyworld", overrides={
        "probe": ["toyworld:200"], "units": f"0-{N_UNITS - 1}", "crop.top_k": 4,
        "score.images_per_concept": 4, "image_bank": "none", "chunk_units": 2, **kw})


def _ray(**kw) -> RunConfig:
    return _config(executor="ray", ray_actors=2, **kw)


@pytest.fixture(scope="module")
def cluster():
    """One local Ray cluster for the module (starting one takes seconds); the executor
    uses it and leaves it running."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, one_thread):
    """All units with the local executor: :func:`_files` of its run, and its work counts."""
    run = tmp_path_factory.mktemp("local")
    work = describe(_config(), run, progress=False).work
    return _files(run), work


def _files(run):
    """(unit file -> its record with floats to 7 significant digits, labels.csv)."""
    units = {p.name: _rounded(json.loads(p.read_text()))
             for p in (run / "units" / "fc").glob("*.json")}
    return units, (run / "labels.csv").read_text()


def _rounded(x):
    if isinstance(x, float):
        return float(f"{x:.7g}")
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_rounded(v) for v in x]
    return x


def test_ray_records_are_those_of_the_local_executor(cluster, reference, tmp_path):
    result = describe(_ray(), tmp_path, progress=False)
    assert result.done_now == list(range(N_UNITS)) and not result.failed
    units, labels = _files(tmp_path)
    assert sorted(units) == sorted(reference[0][0]) and len(units) == N_UNITS
    assert (units, labels) == reference[0]
    # The actors' work comes back to the driver: at least what the local run did (two
    # actors may both caption or draw an image before either has cached it).
    local = reference[1]
    for count in ("captioned_images", "generated_images", "encoded_images", "target_images"):
        assert getattr(local, count) <= getattr(result.work, count) \
            <= 1.5 * getattr(local, count), count
    # The actors are gone; the cluster the test started is not.
    assert ray.is_initialized() and not ray.util.list_named_actors()


def test_killed_actor_is_replaced_and_every_unit_written_once(cluster, reference, tmp_path,
                                                               monkeypatch):
    writes: dict[int, int] = {}
    write_unit = RunStore.write_unit

    def counted(self, record):
        writes[record.unit] = writes.get(record.unit, 0) + 1
        return write_unit(self, record)

    monkeypatch.setattr(RunStore, "write_unit", counted)
    out: dict = {}
    run = threading.Thread(target=lambda: out.update(
        result=describe(_ray(chunk_units=1), tmp_path, progress=False)))
    run.start()
    deadline = time.monotonic() + 300
    while len(writes) < 2 and run.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    names = ray.util.list_named_actors()
    assert len(names) == 2 and run.is_alive()
    ray.kill(ray.get_actor(names[0]), no_restart=False)  # as a crash: Ray restarts it
    killed_with_left = N_UNITS - len(writes)
    run.join(600)
    assert not run.is_alive()
    assert killed_with_left >= 2  # the kill came with chunks still to do
    result = out["result"]
    assert result.done_now == list(range(N_UNITS)) and not result.failed
    assert writes == dict.fromkeys(range(N_UNITS), 1)  # each record written once
    assert _files(tmp_path) == reference[0]


def test_runs_resume_across_executors(cluster, reference, tmp_path):
    ray_first, local_first = tmp_path / "ray-first", tmp_path / "local-first"
    describe(_ray(units="0-2"), ray_first, progress=False)
    then = describe(_config(), ray_first, progress=False)
    assert then.already_done == [0, 1, 2] and then.done_now == list(range(3, N_UNITS))
    describe(_config(units="0-2"), local_first, progress=False)
    then = describe(_ray(), local_first, progress=False)
    assert then.already_done == [0, 1, 2] and then.done_now == list(range(3, N_UNITS))
    assert _files(ray_first) == reference[0]
    assert _files(local_first) == reference[0]


def test_ray_settings_need_the_ray_executor():
    with pytest.raises(ConfigError, match="ray_actors given, but executor is 'local'"):
        _config(ray_actors=2)
    with pytest.raises(ConfigError, match="ray_address given"):
        _config(ray_address="auto")
    with pytest.raises(ConfigError, match="executor must be one of local, ray"):
        _config(executor="dask")
    with pytest.raises(ConfigError, match="use auto, cuda or cpu"):
        _ray(device="cuda:1")
    # The executor is not part of a run's results: a run resumes with either.
    assert _ray().results_key() == _config().results_key()


def test_ray_executor_refuses_what_it_cannot_use(tmp_path):
    from dnd.backends.base import resolve_device
    from dnd.backends.factory import load_models

    config = _ray()
    with pytest.raises(ConfigError, match="executor ray builds its own"):
        describe(config, tmp_path / "a", progress=False,
                 models=load_models(config, resolve_device("cpu")))


def test_a_chunk_that_keeps_losing_its_actor_fails_its_units_at_their_next_stage():
    from dnd.executor import TRIES, _lost
    from dnd.record import UnitRecord

    error = RuntimeError("The actor died unexpectedly before finishing this task.\nmore")
    fresh = _lost(UnitRecord("fc", 3), error)
    assert fresh.failed and fresh.failed_at == "crops"
    assert fresh.error == (f"crops: the Ray actor running it was lost {TRIES} times (The "
                           "actor died unexpectedly before finishing this task.)")
    captioned = _lost(UnitRecord("fc", 4, stage="captions"), error)
    assert captioned.failed_at == "candidates"
    before = UnitRecord("fc", 5).fail("captions", "captions: out of memory")
    assert _lost(before, error) == before  # failed earlier, left alone
