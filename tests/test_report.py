"""`dnd report`: static HTML browser and rating-study export, on a hand-made run directory."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
from PIL import Image

from dnd.config import RunConfig, save_config
from dnd.io import atomic_write_json
from dnd.record import UnitRecord
from dnd.report import add_cli, build_report, export_rating
from dnd.report.html import script_json
from dnd.stages.select import select_concept
from dnd.store import RunStore

XSS = "<script>alert(1)</script>"


def make_run(root):
    """A finished-looking run: 4 probe PNGs, units 0 (crops), 1 (XSS label), 2 (failed)."""
    probe = root / "probe"
    probe.mkdir()
    for i, colour in enumerate(["red", "green", "blue", "white"]):
        Image.new("RGB", (64, 48), colour).save(probe / f"{i}.png")
    run = root / "run"
    run.mkdir()
    save_config(RunConfig(model="tiny", layer="fc", probe=[str(probe)],
                          summarizer="consensus"), run / "config.yaml")
    store = RunStore(run)
    store.features.root.mkdir(parents=True)
    for unit, cands in ((0, ["red circle", "dotted"]), (1, [XSS, "blue sky"])):
        sel = select_concept(cands, np.array([[5.0, 4.0], [1.0, 0.5]]),
                             np.full((2, 4), 0.5), k=2, beta=2).to_json()
        keys = {c: [f"abc{unit}{j}{n}" for n in range(2)] for j, c in enumerate(cands)}
        for ks in keys.values():
            for k in ks:
                Image.new("RGB", (32, 32), "gray").save(store.features.thumbnail(k))
        ev = [{"index": 0, "image": "0.png", "box": None, "activation": 3.0},
              {"index": 1, "image": "1.png", "box": [8, 4, 40, 30], "activation": 2.0}]
        store.write_unit(UnitRecord.from_json({
            "layer": "fc", "unit": unit, "model": "tiny", "stage": "labels",
            "top_images": ev[:1] + [dict(ev[1], box=None)],
            "crops": ev[1:], "activating_images": ev,
            "captions": ["a red thing", f"caption {XSS}"],
            "candidates": {"unit": unit, "concepts": cands,
                           "replies": [f"reply {XSS}"], "error": None},
            "generated": keys, "selection": sel, "labels": sel["labels"],
            "interpretability": 0.5 + unit / 10, "dropped": {}}))
    store.write_unit(UnitRecord.from_json({
        "layer": "fc", "unit": 2, "stage": "crops", "error": f"captions: boom {XSS}",
        "failed_at": "captions",
        "top_images": [{"index": 3, "image": "3.png", "box": None, "activation": 1.0}]}))
    return run


def test_index_lists_units_and_escapes_model_text(tmp_path):
    run = make_run(tmp_path)
    index = build_report(run)
    assert index == run / "report" / "index.html"
    text = index.read_text()
    data = json.loads(re.search(r'id="units-data">(.*?)</script>', text, re.S).group(1))
    assert [u["unit"] for u in data] == [0, 1, 2]
    assert data[0]["labels"][0] == "red circle" and data[1]["labels"][0] == XSS
    assert data[2]["error"].startswith("captions: boom")
    assert "i.loading='lazy'" in text
    assert XSS not in text and "\\u003cscript\\u003e" in text
    for u in data:
        for t in u["thumbs"]:
            assert (run / "report" / t).is_file()
    assert "http://" not in text and "https://" not in text  # no CDN, works offline


def test_unit_pages_show_scores_boxes_and_escaped_text(tmp_path):
    run = make_run(tmp_path)
    build_report(run)
    page0 = (run / "report" / "units" / "fc" / "0.html").read_text()
    sel = RunStore(run).read_unit("fc", 0).scoring.selection
    assert '<h1 id=label>red circle</h1>' in page0 and "<title>fc #0: red circle" in page0
    assert "id=candidates" in page0 and "image-product weight" in page0
    for i in range(2):
        assert f"{sel.final_scores[i]:.3f}" in page0
        assert f"{sel.rank_scores[i]:.3f}" in page0
    assert "won with the best final score" in page0
    # The crop box is drawn over the original image in its pixel space (64 x 48).
    assert 'viewBox="0 0 64 48"' in page0 and '<rect x="8" y="4" width="32" height="26"/>' in page0
    imgs = re.findall(r'src="\.\./\.\./([^"]+)"', page0)
    assert any(p.startswith("img/gen/") for p in imgs) and any("crop" in p for p in imgs)
    for p in imgs:
        assert (run / "report" / p).is_file(), p
    with Image.open(run / "report" / imgs[0]) as im:
        assert max(im.size) <= 320

    page1 = (run / "report" / "units" / "fc" / "1.html").read_text()
    assert XSS not in page1 and "&lt;script&gt;alert(1)&lt;/script&gt;" in page1
    page2 = (run / "report" / "units" / "fc" / "2.html").read_text()
    assert "id=error" in page2 and "boom &lt;script&gt;" in page2 and XSS not in page2


def test_script_json_cannot_close_the_script():
    s = script_json({"a": "</script><!-- & x"})
    assert "<" not in s and ">" not in s and "&" not in s
    assert json.loads(s) == {"a": "</script><!-- & x"}


def test_export_rating_shape_and_seeded_order(tmp_path):
    run = make_run(tmp_path)
    other = tmp_path / "clip_dissect.csv"
    other.write_text("Neuron ID,Label 1\n0,red\n1,sky\n")
    csv_path, json_path = export_rating(run, tmp_path / "rating", seed=3,
                                        methods={"clip-dissect": other})
    data = json.loads(json_path.read_text())
    assert [u["unit"] for u in data["units"]] == [0, 1]  # the failed unit has no labels
    u0 = data["units"][0]
    assert sorted(o["method"] for o in u0["options"]) == ["clip-dissect", "dnd"]
    assert next(o for o in u0["options"] if o["method"] == "dnd")["labels"][0] == "red circle"
    assert len(u0["images"]) == 2 and all(Image.open(p).size for p in u0["images"])
    rows = list(csv.DictReader(csv_path.open()))
    assert len(rows) == 4 and rows[0]["images"].split(";") == u0["images"]
    again = json.loads(export_rating(run, tmp_path / "again", seed=3,
                                     methods={"clip-dissect": other})[1].read_text())
    assert again["units"] == data["units"]
    orders = {tuple(o["method"] for u in json.loads(export_rating(
        run, tmp_path / f"s{s}", seed=s, methods={"clip-dissect": other})[1].read_text())
        ["units"] for o in u["options"]) for s in range(8)}
    assert len(orders) > 1  # the seed changes the order


def test_cli_handler(tmp_path, capsys):
    import argparse

    run = make_run(tmp_path)
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers())
    args = parser.parse_args(["report", str(run), "--export-rating", str(tmp_path / "r")])
    assert args.func(args) == 0
    assert (run / "report" / "index.html").is_file() and (tmp_path / "r.csv").is_file()
    args = parser.parse_args(["report", str(tmp_path / "missing")])
    assert args.func(args) == 2
    assert "not a dnd run directory" in capsys.readouterr().err


def test_report_without_probe_images(tmp_path, caplog):
    run = make_run(tmp_path)
    (tmp_path / "probe" / "1.png").write_bytes(b"not a png")  # one unreadable image
    build_report(run)
    assert "probe image 1 unreadable" in caplog.text
    page = (run / "report" / "units" / "fc" / "0.html").read_text()
    assert "img/probe/0_l.jpg" in page and "class=noimg" in page  # a placeholder for 1
    for p in (tmp_path / "probe").iterdir():
        p.unlink()
    (tmp_path / "probe").rmdir()  # the probing set moved away: pages, no images
    text = build_report(run).read_text()
    assert "probing set could not be opened" in text
    assert (run / "report" / "units" / "fc" / "2.html").is_file()


def test_comparison_page_puts_methods_side_by_side_escaped():
    from dnd.report.compare import comparison_page

    page = comparison_page("cmp", {"fc": {
        "methods": ["DnD", "CLIP-Dissect"], "truths": {0: "red circle", 1: None},
        "labels": {"DnD": {0: "red circle", 1: "<b>x</b>"}, "CLIP-Dissect": {0: "blue"}},
        "agrees": {"DnD": {0: True, 1: False}, "CLIP-Dissect": {0: False, 1: False}},
        "links": {0: "dnd/fc/report/units/fc/0.html"}}})
    assert "<th>DnD</th><th>CLIP-Dissect</th>" in page
    assert '<td class="ok">red circle</td><td class="">blue</td>' in page
    assert "&lt;b&gt;x&lt;/b&gt;" in page and "<b>x</b>" not in page
    assert "(no clear concept)" in page and 'href="dnd/fc/report/units/fc/0.html"' in page


def _cards(index_text):
    return json.loads(re.search(r'id="units-data">(.*?)</script>', index_text, re.S).group(1))


def _unit(store, unit, **fields):
    """A labelled fc-style unit: two whole top images, no maps, no crops."""
    top = [{"index": 0, "image": "0.png", "box": None, "activation": 3.0},
           {"index": 1, "image": "1.png", "box": None, "activation": 2.0}]
    rec = {"layer": "fc", "unit": unit, "model": "tiny", "stage": "labels", "top_images": top,
           "crops": [], "activating_images": top, "captions": ["a", "b"],
           "labels": [f"concept {unit}"], "interpretability": 0.6}
    store.write_unit(UnitRecord.from_json({**rec, **fields}))


def test_linear_layer_page_promises_no_heatmap_or_crops(tmp_path):
    run = make_run(tmp_path)
    _unit(RunStore(run), 3)  # a Linear layer: no spatial maps, so no heatmap, no crops
    grid = [[0.0, 1.0], [2.0, 3.0]]
    _unit(RunStore(run), 4, top_images=[{"index": 2, "image": "2.png", "box": None,
                                         "activation": 1.0, "map": grid,
                                         "view_box": [0, 0, 64, 48]}])  # spatial, no crop
    build_report(run)
    page = (run / "report" / "units" / "fc" / "3.html").read_text()
    assert "activation heatmap" not in page and "crop(s)" not in page
    assert "<image class=heat" not in page and "<rect" not in page
    assert "<h2>Top images</h2>" in page and "has no spatial maps" in page
    spatial = (run / "report" / "units" / "fc" / "4.html").read_text()
    assert "<h2>Top images: activation heatmap</h2>" in spatial and "crop(s)" not in spatial
    assert "No attention crops" in spatial and "<image class=heat" in spatial
    with_crops = (run / "report" / "units" / "fc" / "0.html").read_text()
    assert "attention crops</h2>" in with_crops and "1 crop(s)" in with_crops


def test_records_with_extra_fields_still_render(tmp_path):
    run = make_run(tmp_path)
    store = RunStore(run)
    top = [{"index": 0, "image": "0.png", "box": None, "activation": 3.0, "later": 1}]
    atomic_write_json(store.unit_path("fc", 3), {  # as a later dnd might write it
        "schema": 1, "layer": "fc", "unit": 3, "stage": "labels", "top_images": top,
        "crops": [], "activating_images": top, "labels": ["concept 3"],
        "fallback": "nothing could be rendered",
        "candidates": {"unit": 3, "concepts": ["a"], "sources": [["llm"]], "new_field": 1},
        "future": {"anything": [1, 2]}})
    cards = _cards(build_report(run).read_text())
    assert cards[-1]["unit"] == 3 and cards[-1]["labels"] == ["concept 3"]
    assert cards[-1]["fallback"] is True
    page = (run / "report/units/fc/3.html").read_text()
    assert "<h1 id=label>concept 3</h1>" in page and "nothing could be rendered." in page
    assert "<li>a <span class=src>(from llm)</span></li>" in page


def test_record_from_a_newer_dnd_stops_the_report_naming_the_file(tmp_path, capsys):
    import argparse

    run = make_run(tmp_path)
    path = RunStore(run).unit_path("fc", 7)
    atomic_write_json(path, {"schema": 99, "layer": "fc", "unit": 7})
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers())
    args = parser.parse_args(["report", str(run)])
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "schema 99 is newer" in err and "upgrade dnd" in err


def test_run_stopped_early_says_so_instead_of_no_label(tmp_path):
    run = make_run(tmp_path)
    save_config(RunConfig(model="tiny", layer="fc", probe=[str(tmp_path / "probe")],
                          summarizer="consensus", stop_after="crops"), run / "config.yaml")
    store = RunStore(run)
    for unit in (0, 1):  # as `--stop-after crops` leaves them: top images and crops only
        rec = store.read_unit("fc", unit)
        store.write_unit(UnitRecord(rec.layer, rec.unit, stage="crops", model=rec.model,
                                    crops=rec.crops))
    text = build_report(run).read_text()
    assert "stopped after the <b>crops</b> stage" in text
    assert "<code>--stop-after crops</code>" in text
    cards = _cards(text)
    assert [c["stage"] for c in cards[:2]] == ["crops", "crops"]
    assert cards[0]["score"] is None and cards[0]["interp"] is None
    page = (run / "report" / "units" / "fc" / "0.html").read_text()
    assert "<h1 id=label>no label yet: stopped after crops</h1>" in page
    assert "id=stopped" in page and "Interpretability score" not in page
    assert "<h2>Activating images</h2>" in page  # no captions promised before that stage


def test_failed_card_shows_a_short_reason_and_the_page_the_full_error(tmp_path):
    from dnd.report.build import short_reason

    run = make_run(tmp_path)
    long_error = ("candidates: LLM request failed after 5 attempts: 503 Service Unavailable "
                  + "upstream said <busy> " * 50 + "\nTraceback (most recent call last): ...")
    assert len(long_error) > 1000
    RunStore(run).write_unit(UnitRecord("fc", 2, stage="captions", error=long_error,
                                        failed_at="candidates"))
    text = build_report(run).read_text()
    card = _cards(text)[2]
    assert len(card["error"]) <= 120 and card["error"].endswith("\u2026")
    assert card["error"].startswith("candidates: LLM request failed after 5 attempts")
    assert card["failed_at"] == "candidates"
    assert "upstream said <busy> " * 3 not in text  # the index carries no flood
    page = (run / "report" / "units" / "fc" / "2.html").read_text()
    assert "<h1 id=label>failed at candidates</h1>" in page
    import html as html_lib

    assert html_lib.escape(long_error) in page  # the full error, escaped
    assert short_reason("boom") == "boom" and short_reason("a\nb") == "a\u2026"
    assert short_reason("x" * 300, limit=50) == "x" * 49 + "\u2026"


# Interpretability scores of the toy world's conv4 units 0-31, measured by `dnd demo`
# (2,000 probing scenes): unit 25 ("cyan triangle" over red stars) and unit 0 stand out.
CONV4_INTERP = [0.207, 0.646, 0.63, 0.735, 0.936, 0.844, 0.787, 0.602, 0.753, 0.51, 0.81,
                0.854, 0.376, 0.526, 0.804, 0.643, 0.474, 0.729, 0.633, 0.681, 0.613, 0.559,
                0.529, 0.404, 0.896, 0.136, 0.899, 0.77, 0.419, 0.901, 0.647, 0.808]


def test_low_interpretability_rule_flags_the_outlier_at_any_scale():
    from dnd.report.rules import LOW_INTERP_MIN_UNITS, low_interpretability_rule

    rule = low_interpretability_rule(CONV4_INTERP)
    assert [u for u, s in enumerate(CONV4_INTERP) if rule.is_low(s)] == [0, 25]
    assert rule.n == 32 and 0.207 < rule.threshold < 0.376
    # Independent of the encoder's scale and offset: the same units under a x + b.
    moved = low_interpretability_rule([0.3 * s + 0.6 for s in CONV4_INTERP] + [None])
    assert [u for u, s in enumerate(CONV4_INTERP) if moved.is_low(0.3 * s + 0.6)] == [0, 25]
    assert "below this layer's low threshold" in rule.explain(0.136)
    assert "above" in rule.explain(0.6) and not rule.is_low(None)
    few = low_interpretability_rule(CONV4_INTERP[:LOW_INTERP_MIN_UNITS - 1])
    assert few.threshold is None and not few.is_low(0.0)
    assert "not judged" in few.explain(0.1)
    flat = low_interpretability_rule([0.5] * 10 + [0.1])
    assert flat.threshold is None and "no spread" in flat.explain(0.1)


def test_low_interpretability_units_are_marked_with_the_reason(tmp_path):
    run = make_run(tmp_path)
    store = RunStore(run)
    for unit, score in enumerate(CONV4_INTERP, 3):  # the toy conv4 layer's scores
        _unit(store, unit, interpretability=score)
    text = build_report(run).read_text()
    cards = {c["unit"]: c for c in _cards(text)}
    assert cards[28]["low"] is True  # conv4's unit 25
    assert [u for u, c in cards.items() if c["low"]] == [3, 28]
    assert "id=low-rule" in text and "2 low interpretability" in text
    assert "interp_low" in text and "id=lowonly" in text  # sort lowest first, filter
    page = (run / "report" / "units" / "fc" / "28.html").read_text()
    assert "class=lowwarn" in page and "low interpretability</span>" in page
    assert "Interpretability score 0.136 is below this layer&#x27;s low threshold" in page
    normal = (run / "report" / "units" / "fc" / "5.html").read_text()
    assert "class=lowwarn" not in normal and "above this layer&#x27;s low threshold" in normal


def test_long_image_names_wrap():
    from dnd.report.assets import CSS

    rule = re.search(r"(?m)^figure\{[^}]*\}", CSS).group(0)
    assert "overflow-wrap:anywhere" in rule  # the browser test checks the layout itself


def test_demo_top_page_links_both_layers_reports(tmp_path):
    from dnd.benchmarks.demo import LayerAgreement, write_top_page

    for layer in ("fc", "conv4"):
        (tmp_path / layer / "report").mkdir(parents=True)
        (tmp_path / layer / "report" / "index.html").write_text("<html></html>")
    table = [LayerAgreement("fc", 2, 2, 1, 2), LayerAgreement("conv4", 2, 1, 1, 1)]
    details = {
        "fc": [{"unit": 0, "truth": "red circle", "labels": ["crimson disc", "x"],
                "label1_agrees": True, "top3_agrees": True},
               {"unit": 1, "truth": "red star", "labels": [XSS, "red star"],
                "label1_agrees": False, "top3_agrees": True}],
        "conv4": [{"unit": 7, "truth": None, "labels": ["stripes"],
                   "label1_agrees": False, "top3_agrees": False},
                  {"unit": 9, "truth": "orange", "labels": ["orange ring"],
                   "label1_agrees": True, "top3_agrees": True}]}
    page = write_top_page(tmp_path, table, details)
    assert page == tmp_path / "index.html"
    text = page.read_text()
    assert 'href="fc/report/index.html"' in text and 'href="conv4/report/index.html"' in text
    assert "<td>1 (50.0%)</td><td>2 (100.0%)</td>" in text  # fc: Label 1, Labels 1-3
    assert 'href="fc/report/units/fc/1.html"' in text
    assert 'href="conv4/report/units/conv4/9.html"' in text
    assert XSS not in text and "&lt;script&gt;" in text
    assert '<td class="ok">crimson disc</td>' in text
    assert '<td class="ok">red star</td>' in text  # Label 2 names the truth
    assert "(no clear concept)" in text and "http" not in text
