"""The Ray executor (`dnd describe --executor ray`) on a local two-CPU Ray cluster with the
toy world: records equal to the local executor's, an actor killed mid-run replaced with
every unit written exactly once, and runs that resume across executors.

What a user may rely on (README, "What is reproducible"): with the same thread count (Ray
gives each CPU actor one thread, so the local reference runs with one torch thread too and
the actors are pinned to one), a record does not depend on the executor, on which actor
draws an image first or on how busy the machine is. Generated images are run through the
target and the encoder in batches fixed by their own keys (``ConceptScorer.feature_block``),
so an image two units share gets the same features bit for bit whichever chunk or actor
computes it. With the same chunks, records are equal bit for bit. With other chunks (another
``chunk_units``, or a run resumed at another unit), the activating images of a chunk's units
are still embedded together, so the image-product weights, the final scores and the
interpretability score may move in their last digits (:data:`CHUNK_FLOATS`, to
:data:`REL_TOL`); labels, candidates, selection order and every other field stay exact.
"""

from __future__ import annotations

import json
import math
import threading
import time

import pytest
import torch

from dnd.api import describe
from dnd.config import ConfigError, RunConfig, load_config
from dnd.store import RunStore

ray = pytest.importorskip("ray")

N_UNITS = 8
# Floats computed from a chunk's activating images embedded together (see the docstring).
CHUNK_FLOATS = frozenset({"weights", "final_scores", "interpretability"})
REL_TOL = 1e-5


def _config(**kw) -> RunConfig:
    return load_config(preset="toyworld", overrides={
        "probe": ["toyworld:200"], "units": f"0-{N_UNITS - 1}", "crop.top_k": 4,
        "score.images_per_concept": 4, "image_bank": "none", "chunk_units": 2, **kw})


def _ray(**kw) -> RunConfig:
    return _config(executor="ray", ray_actors=2, **kw)


@pytest.fixture(scope="module")
def cluster():
    """One local Ray cluster for the module (starting one takes seconds); the executor
    uses it and leaves it running. Its actors run one thread each, as the reference does,
    whatever OMP_NUM_THREADS this process was started with."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
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
    """(unit file -> its record, labels.csv)."""
    units = {p.name: json.loads(p.read_text()) for p in (run / "units" / "fc").glob("*.json")}
    return units, (run / "labels.csv").read_text()


def _differences(a, b, where: str = "", loose: bool = False) -> list[str]:
    """Where ``b`` differs from ``a``: exactly, except floats under a :data:`CHUNK_FLOATS`
    key (``loose``: inside one), which may differ by :data:`REL_TOL` relative."""
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{where}: keys {sorted(set(a) ^ set(b))}"]
        return [d for k in sorted(a)
                for d in _differences(a[k], b[k], f"{where}.{k}", loose or k in CHUNK_FLOATS)]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where}: length {len(a)} -> {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b))
                for d in _differences(x, y, f"{where}[{i}]", loose)]
    if loose and isinstance(a, float) and isinstance(b, float):
        return [] if math.isclose(a, b, rel_tol=REL_TOL, abs_tol=1e-9) else [
            f"{where}: {a!r} -> {b!r}"]
    return [] if a == b and type(a) is type(b) else [f"{where}: {a!r} -> {b!r}"]


def _same_but_chunk_floats(run_files, reference_files) -> None:
    (units, labels), (ref_units, ref_labels) = run_files, reference_files
    assert sorted(units) == sorted(ref_units) and labels == ref_labels
    problems = [d for name in sorted(ref_units)
                for d in _differences(ref_units[name], units[name], name)]
    assert not problems, "\n".join(problems[:20])


def test_differences_are_exact_but_for_chunk_floats():
    record = {"labels": ["red"], "interpretability": 0.5,
              "selection": {"order": [1, 0], "final_scores": [0.25, 0.5],
                            "rank_scores": [3.0, 4.0]}}
    moved = json.loads(json.dumps(record))
    moved["interpretability"] += 1e-8
    moved["selection"]["final_scores"][0] += 1e-9
    assert _differences(record, moved) == []
    for path, value in [(("selection", "rank_scores"), [3.0, 4.000001]),
                        (("selection", "order"), [0, 1]), (("labels",), ["blue"])]:
        other = json.loads(json.dumps(record))
        (other["selection"] if len(path) == 2 else other)[path[-1]] = value
        assert _differences(record, other), path
    assert _differences({"x": 1}, {"x": 1.0}) == [".x: 1 -> 1.0"]


def test_ray_records_are_those_of_the_local_executor(cluster, reference, tmp_path):
    result = describe(_ray(), tmp_path, progress=False)
    assert result.done_now == list(range(N_UNITS)) and not result.failed
    units, labels = _files(tmp_path)
    assert sorted(units) == sorted(reference[0][0]) and len(units) == N_UNITS
    assert (units, labels) == reference[0]  # the same chunks: bit for bit
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
    _same_but_chunk_floats(_files(tmp_path), reference[0])  # chunks of 1 unit, not 2


def test_runs_resume_across_executors(cluster, reference, tmp_path):
    ray_first, local_first = tmp_path / "ray-first", tmp_path / "local-first"
    describe(_ray(units="0-2"), ray_first, progress=False)
    then = describe(_config(), ray_first, progress=False)
    assert then.already_done == [0, 1, 2] and then.done_now == list(range(3, N_UNITS))
    describe(_config(units="0-2"), local_first, progress=False)
    then = describe(_ray(), local_first, progress=False)
    assert then.already_done == [0, 1, 2] and then.done_now == list(range(3, N_UNITS))
    _same_but_chunk_floats(_files(ray_first), reference[0])
    _same_but_chunk_floats(_files(local_first), reference[0])


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
    from dnd.loading import load_models

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
