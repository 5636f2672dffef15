"""`dnd bench activations` on a small synthetic set: the numbers it reports are real."""

from __future__ import annotations

import pytest

from dnd.benchmarks.activations import bench_activations, write_activation_bench


def test_activation_bench_reports_float16_size_and_throughput(tmp_path):
    r = bench_activations(n_images=3000, n_units=64, batch_size=128)
    assert r["disk_mb"] == pytest.approx(3000 * 64 * 2 / 2**20)  # float16, nothing more
    assert r["images_per_s"] > 0 and r["peak_rss_growth_mb"] >= 0
    path = write_activation_bench(tmp_path, n_images=1000, n_units=32)
    text = path.read_text()
    assert "dnd bench activations --images 1000 --units 32" in text
    assert "| activations on disk | 0.1 MB" in text


def test_per_unit_path_gives_identical_records_and_does_more_work(tmp_path):
    """`dnd bench describe --compare naive` on a small toy run: the per-unit baseline and the
    batched pipeline decide the same captions, candidates, labels and selection order, and
    the batched one captions and generates fewer images (cross-unit dedupe)."""
    from dnd.benchmarks.describe import bench_describe, describe_bench_lines

    r = bench_describe(units="0-3", n_probe=300, compare_naive=True, work_dir=tmp_path)
    batched, naive = r["batched"], r["naive"]
    assert r["differences"] == []
    assert set(batched["records"]) == {0, 1, 2, 3}
    assert all(len(rec.labels) >= 1 for rec in batched["records"].values())
    assert batched["captioned"][0] < naive["captioned"][0]
    assert batched["generated"][0] < naive["generated"][0]
    assert set(batched["stage_seconds"]) == {"activations", "crops", "captions", "candidates",
                                             "labels"}
    text = "\n".join(describe_bench_lines(r, "dnd bench describe --units 0-3"))
    assert "identical captions, candidates, labels, selection order and failures" in text
    assert "| units per minute, end to end |" in text
    # work per unit: the per-unit path generates every image again for every unit
    gen = {run: r[run]["work"].generated_images for run in ("batched", "naive")}
    assert gen["batched"] == batched["generated"][0] < gen["naive"]
    assert f"| generated images | {gen['batched'] / 4:,.1f} | {gen['naive'] / 4:,.1f} | 45.0 |" \
        in text
    assert "| denoising steps | 0.0 | 0.0 | 2,250.0 |" in text  # the toy renderer has none


class _FirstWordsChat:
    """A deterministic stand-in LLM: a concept is the first listed caption (the summariser
    cuts it to its subject), a merge the first concept."""

    cache_identity = {"backend": "first-words"}

    def complete_many(self, requests):
        from dnd.backends.llm import ChatReply

        replies = []
        for r in requests:
            text = r.messages[-1]["content"]
            if text.startswith("Concepts: "):
                reply = text.removeprefix("Concepts: ").split(",")[0]
            else:
                first = next(line for line in text.splitlines() if line.startswith("1. "))
                reply = first.removeprefix("1. ")
            replies.append(ChatReply((reply,) * r.n, prompt_tokens=50, completion_tokens=3))
        return replies


def test_bench_with_an_llm_counts_its_requests_in_both_paths(tmp_path, monkeypatch):
    from dnd.backends.llm import LLMS
    from dnd.benchmarks.describe import bench_describe, describe_bench_lines
    from dnd.record import LLMUsage

    monkeypatch.setitem(LLMS._factories, "first-words", lambda device="cpu": _FirstWordsChat())
    r = bench_describe(units="0-2", n_probe=300, compare_naive=True, llm="first-words",
                       work_dir=tmp_path)
    assert r["differences"] == []
    batched, naive = r["batched"]["llm_requests"][0], r["naive"]["llm_requests"][0]
    # Per unit one request, its T = 5 replies drawn from it (n = 5): no re-ask is needed.
    # (Batched, units whose captions are the same share one request.)
    assert naive == 3 and batched <= naive
    for run in ("batched", "naive"):
        for rec in r[run]["records"].values():
            assert rec.candidates.usage == LLMUsage(requests=1, prompt_tokens=50,
                                                    completion_tokens=3, cached=0)
    concepts = {c for rec in r["batched"]["records"].values()
                for c in rec.candidates.concepts}
    assert concepts and all(0 < len(c.split()) <= 5 for c in concepts)
    text = "\n".join(describe_bench_lines(r, "dnd bench describe --llm first-words"))
    assert "| LLM requests answered (after the run's deduplication) |" in text
    assert "| LLM requests per unit (unit records, cached replies included) | 1.0 | 1.0 |" \
        in text
    assert ("| prompt tokens per unit (unit records, cached replies included) | 50.0 | 50.0 |"
            in text)
    # the work counters: what was sent, one request per unit on the per-unit path
    assert f"| llm requests | {batched / 3:,.1f} | 1.0 | 17.1 |" in text
    assert r["naive"]["work"].prompt_tokens == 150
    assert "candidates from the LLM summariser with `first-words`" in text


def test_same_results_names_the_unit_and_field_that_differ():
    import dataclasses

    from dnd.benchmarks.describe import same_results
    from dnd.record import Candidates, Scoring, UnitRecord

    rec = UnitRecord("fc", 0, captions=("a red circle",),
                     candidates=Candidates(0, ("red circle", "blue star")),
                     scoring=Scoring(("red circle",)))
    a = {0: rec}
    b = {0: dataclasses.replace(rec, scoring=Scoring(("blue star",)))}
    assert same_results(a, a) == []
    (diff,) = same_results(a, b)
    assert diff == "unit 0: labels ('red circle',) != ('blue star',)"
    assert same_results(a, {}) == ["unit 0: captions ('a red circle',) != None",
                                   "unit 0: labels ('red circle',) != None",
                                   "unit 0: candidates ('red circle', 'blue star') != None"]


def test_paper_configs_are_stable_diffusion_v1_5_and_blip_base():
    """The random-weight stand-ins have the published architectures (parameter counts of
    SD v1-5's UNet, VAE and CLIP ViT-L/14 text encoder; BLIP base's ViT-B/16 at 384 px)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import BlipConfig, CLIPTextConfig, CLIPTextModel

    from dnd.benchmarks.paper_scale import SD15_TEXT, SD15_UNET, SD15_VAE

    def count(m):
        return sum(p.numel() for p in m.parameters())

    with torch.device("meta"):  # shapes only: nothing is allocated
        assert count(UNet2DConditionModel(**SD15_UNET)) == 859_520_964
        assert count(AutoencoderKL(**SD15_VAE)) == 83_653_863
        assert count(CLIPTextModel(CLIPTextConfig(**SD15_TEXT))) == 123_060_480
    vision = BlipConfig().vision_config
    assert (vision.image_size, vision.patch_size, vision.hidden_size,
            vision.num_hidden_layers) == (384, 16, 768, 12)


def test_projected_hours_follow_the_per_unit_work():
    from dnd.benchmarks.paper_scale import Rates, project_hours

    h = project_hours(Rates(target=1000.0, caption=100.0, generate=10.0, encode=500.0),
                      units=100, probe_images=10_000, gen_dedupe=2.0, llm_calls_per_s=17.0)
    # 100 units x 5 candidates x 10 images / 2 (dedupe) = 2,500 generated images.
    assert h["generation"] == pytest.approx(2500 / 10 / 3600)
    assert h["captions"] == pytest.approx(100 * 10 / 100 / 3600)
    assert h["candidates (LLM)"] == pytest.approx(100 / 3600)
    assert h["activations"] == pytest.approx(10 / 3600)
    assert h["scoring"] == pytest.approx((2500 / 1000 + 2500 / 500) / 3600)
    assert h["total"] == pytest.approx(sum(v for k, v in h.items() if k != "total"))


def test_gpu_estimate_divides_the_per_unit_stages_among_the_gpus():
    from dnd.benchmarks.paper_scale import Rates, project_hours
    from dnd.benchmarks.ray_executor import estimate_hours

    rates = Rates(target=1000.0, caption=100.0, generate=10.0, encode=500.0)
    one = project_hours(rates, units=512, probe_images=10_000)
    per_unit = one["total"] - one["activations"]
    for n in (1, 4, 8):
        h = estimate_hours(n, rates, overhead_per_chunk_s=36.0, units=512, chunk_units=64,
                           probe_images=10_000, actor_start_s=72.0)
        assert h["per-unit stages"] == pytest.approx(per_unit / n)
        assert h["activations (driver, 1 GPU)"] == pytest.approx(one["activations"])
        assert h["actor start"] == pytest.approx(0.02)
        # 8 chunks of 64 units shared by n actors, 36 s each.
        assert h["Ray coordination"] == pytest.approx(8 / n * 36 / 3600)
        assert h["total"] == pytest.approx(sum(v for k, v in h.items() if k != "total"))
    # 3 GPUs: the busiest actor takes 3 of the 8 chunks.
    assert estimate_hours(3, rates, overhead_per_chunk_s=36.0, units=512, chunk_units=64
                          )["Ray coordination"] == pytest.approx(3 * 36 / 3600)


def test_paper_scale_bench_runs_its_stages_with_tiny_stand_ins(tmp_path):
    from dnd.benchmarks.paper_scale import measure, report_lines

    r = measure("cpu", tiny=True, steps=(2,), gen_batch=2, caption_batch=4, work_dir=tmp_path)
    g = r["generation"][2]
    assert g["fraction"] == pytest.approx(g["ours"] / g["raw"])
    assert min(r["target"], r["caption"], r["encode"], g["ours"], g["raw"]) > 0
    text = "\n".join(report_lines(r, "dnd bench paper-scale --tiny"))
    assert text.startswith("# Tiny stand-ins")
    assert "| 2 steps |" in text


def test_paper_scale_bench_refuses_a_cpu_only_machine_without_tiny(monkeypatch):
    import torch

    from dnd.benchmarks.paper_scale import run_cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        run_cli([50], 8, tiny=False, out_dir="results")


def test_per_unit_llm_sends_one_request_at_a_time():
    """The per-unit baseline's LLM path: a batch goes out as one single-request call after
    another, and a failed request comes back as its exception, in order."""
    from dnd.backends.llm import ChatReply, ChatRequest
    from dnd.benchmarks.describe import _OneAtATime

    calls = []

    class Chat:
        cache_identity = {"backend": "fake"}

        def complete_many(self, requests):
            calls.append([r.messages[0]["content"] for r in requests])
            return [RuntimeError("boom") if r.messages[0]["content"] == "bad"
                    else ChatReply((r.messages[0]["content"].upper(),)) for r in requests]

    reqs = [ChatRequest(({"role": "user", "content": t},), 0.0) for t in ("a", "bad", "c")]
    out = _OneAtATime(Chat()).complete_many(reqs)
    assert calls == [["a"], ["bad"], ["c"]]
    assert out[0].text == "A" and out[2].text == "C" and isinstance(out[1], RuntimeError)


def test_selection_bench_compares_adaptive_runs_with_the_full_evaluation(tmp_path):
    from dnd.benchmarks.selection import bench_selection, selection_bench_lines

    r = bench_selection(tmp_path, n_probe=300, layers=(("fc", "0-3"),),
                        variants=((2, 1, 0.0),))
    full, adaptive = r["full"]["fc"], r["screen 2, contenders 1, margin 0"]["fc"]
    assert full["units"] == adaptive["units"] == 4
    # screening: each candidate 2 images, then 8 more for one contender per unit at most
    assert adaptive["work"].generated_images < full["work"].generated_images
    text = "\n".join(selection_bench_lines(r, "dnd bench selection", 300))
    same = sum(adaptive["labels"][u][:1] == full["labels"][u][:1] for u in full["labels"])
    gen = adaptive["work"].generated_images / 4
    assert (f"| screen 2, contenders 1, margin 0 | {gen:.1f} | {same}/4 ({100 * same / 4:.0f}%) |"
            in text)
    assert "| full | " in text and "4/4 (100%) |" in text
    # all layers: the one layer
    assert text.splitlines()[-1].endswith(f"| {gen:.1f} | {same}/4 ({100 * same / 4:.0f}%) |")


def test_selection_bench_layers_share_a_fresh_bank(tmp_path):
    """The second layer of a row draws only what the first did not."""
    from dnd.benchmarks.selection import bench_selection

    r = bench_selection(tmp_path, n_probe=300, layers=(("fc", "0-3"), ("conv4", "0-3")),
                        variants=())
    alone = bench_selection(tmp_path / "alone", n_probe=300, layers=(("conv4", "0-3"),),
                            variants=())
    assert r["full"]["conv4"]["labels"] == alone["full"]["conv4"]["labels"]
    assert (r["full"]["conv4"]["work"].generated_images
            < alone["full"]["conv4"]["work"].generated_images)


def test_latency_regime_batched_and_per_unit_paths_agree(tmp_path):
    """`dnd bench describe --compare naive --llm-latency S` through the real openai backend
    and the local latency server: identical records, and the batched path sends its
    requests together (in flight at once) where the per-unit path sends one at a time."""
    from dnd.benchmarks.describe import bench_describe, describe_bench_lines

    r = bench_describe(units="0-3", n_probe=300, compare_naive=True, llm_latency=0.05,
                       work_dir=tmp_path)
    assert r["differences"] == []
    batched, naive = r["batched"]["work"], r["naive"]["work"]
    assert naive.llm_requests >= 4 and batched.llm_requests <= naive.llm_requests
    assert batched.prompt_tokens > 0 and batched.completion_tokens > 0
    labels = [rec.labels[0] for rec in r["batched"]["records"].values()]
    assert all(labels) and len(labels) == 4
    text = "\n".join(describe_bench_lines(r, "dnd bench describe --llm-latency 0.05"))
    assert "| units summarised (LLM API, 0.05 s per request) |" in text
    assert "answered by the local latency server" in text


def test_latency_server_answers_like_an_openai_server_concurrently():
    import json
    import urllib.error
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    from dnd.benchmarks.latency_server import LatencyServer, reply_for

    assert reply_for([{"role": "user", "content": "Captions:\n1. a red disc\n2. a cat"}]) \
        == "a red disc"
    assert reply_for([{"role": "user", "content": "Concepts: red disc, cat"}]) == "red disc"
    assert reply_for([{"role": "user", "content": "one two three four five six"}]) \
        == "one two three four five"

    def post(url, body):
        req = urllib.request.Request(url, json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req) as resp:
            return json.loads(resp.read())

    with LatencyServer(0.2) as server:
        url = server.base_url + "/chat/completions"
        chat = {"model": "m", "messages": [{"role": "user", "content": "1. a blue ring"}],
                "n": 3}
        with ThreadPoolExecutor(6) as pool:
            replies = list(pool.map(lambda _: post(url, chat), range(6)))
        assert server.requests == 6 and server.max_in_flight > 1  # answered concurrently
        body = replies[0]
        assert [c["message"]["content"] for c in body["choices"]] == ["a blue ring"] * 3
        assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 9,
                                 "total_tokens": 13}
        with pytest.raises(urllib.error.HTTPError, match="404"):
            post(server.base_url + "/embeddings", chat)
        with pytest.raises(urllib.error.HTTPError, match="400"):
            post(url, {"model": "m"})


@pytest.mark.parametrize("name", ["selection", "featurevis", "textvis", "explain", "dictionary"])
def test_toy_table_benches_get_their_command_and_probe_size(name, monkeypatch, tmp_path):
    import importlib

    from dnd.benchmarks.cli import TOY_TABLE_BENCHES
    from dnd.cli import main

    module, function = TOY_TABLE_BENCHES[name][0].split(":")
    calls = []
    monkeypatch.setattr(importlib.import_module(module), function,
                        lambda out, **kw: calls.append((out, kw)))
    assert main(["bench", name, "--probe-size", "300", "--out", str(tmp_path)]) == 0
    assert calls == [(str(tmp_path), {"command": f"dnd bench {name} --probe-size 300",
                                      "n_probe": 300})]
