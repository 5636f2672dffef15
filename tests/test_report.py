"""`dnd report`: static HTML browser and rating-study export, on a hand-made run directory."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
from PIL import Image

from dnd.config import RunConfig, save_config
from dnd.report import add_cli, build_report, export_rating
from dnd.report.build import script_json
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
    gen = run / "cache" / "generated"
    gen.mkdir(parents=True)
    store = RunStore(run)
    for unit, cands in ((0, ["red circle", "dotted"]), (1, [XSS, "blue sky"])):
        sel = select_concept(cands, np.array([[5.0, 4.0], [1.0, 0.5]]),
                             np.full((2, 4), 0.5), k=2, beta=2).to_dict()
        keys = {c: [f"k{unit}{j}{n}" for n in range(2)] for j, c in enumerate(cands)}
        for ks in keys.values():
            for k in ks:
                Image.new("RGB", (32, 32), "gray").save(gen / f"{k}.jpg")
        ev = [{"index": 0, "image": "0.png", "box": None, "activation": 3.0},
              {"index": 1, "image": "1.png", "box": [8, 4, 40, 30], "activation": 2.0}]
        store.write_unit("fc", unit, {
            "layer": "fc", "unit": unit, "model": "tiny", "stage": "labels",
            "top_images": ev[:1] + [dict(ev[1], box=None)],
            "crops": ev[1:], "activating_images": ev,
            "captions": ["a red thing", f"caption {XSS}"],
            "candidates": {"unit": unit, "concepts": cands, "simplified": ["red", "blue"],
                           "replies": [f"reply {XSS}"], "error": None},
            "generated": keys, "selection": sel, "labels": sel["labels"],
            "interpretability": 0.5 + unit / 10, "dropped": {}})
    store.write_unit("fc", 2, {"layer": "fc", "unit": 2, "stage": "crops",
                               "error": f"captions: boom {XSS}", "failed_at": "captions",
                               "top_images": [{"index": 3, "image": "3.png", "box": None,
                                               "activation": 1.0}]})
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
    rec = RunStore(run).read_unit("fc", 0)
    sel = rec["selection"]
    assert '<h1 id=label>red circle</h1>' in page0
    assert "id=candidates" in page0 and "image-product weight" in page0
    for i in range(2):
        assert f"{sel['final_scores'][i]:.3f}" in page0
        assert f"{sel['rank_scores'][i]:.3f}" in page0
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
    from dnd.report.build import comparison_page

    page = comparison_page("cmp", {"fc": {
        "methods": ["DnD", "CLIP-Dissect"], "truths": {0: "red circle", 1: None},
        "labels": {"DnD": {0: "red circle", 1: "<b>x</b>"}, "CLIP-Dissect": {0: "blue"}},
        "agrees": {"DnD": {0: True, 1: False}, "CLIP-Dissect": {0: False, 1: False}},
        "links": {0: "dnd/fc/report/units/fc/0.html"}}})
    assert "<th>DnD</th><th>CLIP-Dissect</th>" in page
    assert '<td class="ok">red circle</td><td class="">blue</td>' in page
    assert "&lt;b&gt;x&lt;/b&gt;" in page and "<b>x</b>" not in page
    assert "(no clear concept)" in page and 'href="dnd/fc/report/units/fc/0.html"' in page
