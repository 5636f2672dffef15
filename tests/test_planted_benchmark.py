"""The planted-unit benchmark's scoring on hand-worked fixtures: the two judges, Labels 1-3
of each method from typed unit records, per-kind aggregation, Labels 2-3 precision, the
calibration AUROC and the bootstrap intervals (no model is run)."""

from __future__ import annotations

import pytest

from dnd.benchmarks.planted import check_trained_for_planted, planted_tables
from dnd.benchmarks.planted_judging import (
    FREE,
    KEYWORD,
    STRICT,
    Judged,
    Rate,
    Truth,
    both_named,
    by_rank_score,
    calibration,
    dnd_labels,
    first_candidates,
    label1_by,
    label_correct,
    most_common_concept,
    other_concepts,
    paired_difference,
    polysemantic_recall,
    rate,
    secondary_precision,
    top_captions,
)
from dnd.record import Candidates, Scoring, UnitRecord

BLUE_STRIPES = Truth("conv4", 15, "compositional", ("blue", "striped"))
CIRCLE_OR_STRIPES = Truth("conv4", 4, "polysemantic", ("red circle", "striped"))
RED = Truth("conv4", 0, "monosemantic", ("red",))
TEXT = Truth("conv3", 10, "textual", ("text",))


def test_strict_judge_needs_every_part_of_a_compositional_concept():
    assert label_correct("cobalt object on stripes", BLUE_STRIPES, STRICT)
    assert label_correct("cobalt object on stripes", BLUE_STRIPES, KEYWORD)
    assert not label_correct("a blue square", BLUE_STRIPES, STRICT)
    assert label_correct("a blue square", BLUE_STRIPES, KEYWORD)  # one part is enough
    assert not label_correct("gray background", BLUE_STRIPES, KEYWORD)
    # the judges agree on every other kind
    for label in ("scarlet disc", "lined background", "red", "circle"):
        assert (label_correct(label, CIRCLE_OR_STRIPES, STRICT)
                == label_correct(label, CIRCLE_OR_STRIPES, KEYWORD))
    with pytest.raises(ValueError, match="unknown judge 'lenient'"):
        label_correct("blue", BLUE_STRIPES, "lenient")


def test_strict_judge_refuses_a_label_naming_concepts_the_unit_lacks():
    caption = "a red star and a blue ring on a striped background"
    for truth in (RED, BLUE_STRIPES, CIRCLE_OR_STRIPES):  # right for all three, keyword
        assert label_correct(caption, truth, KEYWORD)
        assert not label_correct(caption, truth, STRICT)
    assert not label_correct("red star", RED) and label_correct("crimson things", RED)
    assert label_correct("blue object on stripes", BLUE_STRIPES)
    assert not label_correct("blue ring on stripes", BLUE_STRIPES)
    # a polysemantic label may name both of the unit's concepts, nothing else
    assert label_correct("red circle or stripes", CIRCLE_OR_STRIPES)
    assert not label_correct("red circle on a noisy background", CIRCLE_OR_STRIPES)
    assert label_correct("background with the word", TEXT)
    assert not label_correct("dotted background with the word", TEXT)
    # a free unit's AP truth is one concept among those it may need: keyword rule
    free = Truth("conv4", 30, FREE, ("pink",))
    assert label_correct("pink square", free, STRICT) and label_correct("pink square", free,
                                                                        KEYWORD)


def test_polysemantic_label1_names_either_concept_and_recall_needs_both():
    assert label_correct("crimson disc", CIRCLE_OR_STRIPES)
    assert label_correct("stripes", CIRCLE_OR_STRIPES)
    assert not label_correct("red", CIRCLE_OR_STRIPES)  # "red circle" needs both words
    assert both_named(("crimson disc", "lined"), CIRCLE_OR_STRIPES)
    assert both_named(("red circle on stripes",), CIRCLE_OR_STRIPES)  # one label may hold both
    assert not both_named(("crimson disc", "red"), CIRCLE_OR_STRIPES)
    # only Labels 1-3 count
    assert not both_named(("crimson disc", "x", "y", "stripes"), CIRCLE_OR_STRIPES)


def test_local_truth_drops_small_and_planted_kinds_map_one_to_one():
    from dnd.toyworld.planted import PlantedUnit

    local = Truth.of_planted(PlantedUnit("conv4", 8, "local", ("small star",)))
    assert local == Truth("conv4", 8, "local", ("star",))
    assert label_correct("a small star", local) and not label_correct("small", local)
    # the strict judge refuses a colour the unit does not need; the keyword judge does not
    assert not label_correct("a yellow star", local)
    assert label_correct("a yellow star", local, KEYWORD)
    comp = Truth.of_planted(PlantedUnit("conv4", 15, "compositional", ("blue", "striped")))
    assert comp == BLUE_STRIPES and comp.text == "compositional: blue & striped"
    with pytest.raises(ValueError, match="conv4:1 needs non-empty concept"):
        Truth("conv4", 1, "monosemantic", ())


def _record(unit: int, labels=(), candidates=(), captions=(), interp=None) -> UnitRecord:
    return UnitRecord("conv4", unit, stage="labels", captions=tuple(captions),
                      candidates=Candidates(unit, tuple(candidates)),
                      scoring=Scoring(tuple(labels), interp))


def test_ablation_labels_come_from_the_full_runs_record():
    rec = _record(0, labels=("red", "circle"), candidates=("circle", "red", "ring", "star"),
                  captions=("a red circle", "a red circle", "a red ring", "a red star", "x"))
    assert first_candidates(rec) == ("circle", "red", "ring")
    assert top_captions(rec) == ("a red circle", "a red ring", "a red star")  # distinct
    assert first_candidates(UnitRecord("conv4", 1)) == () and top_captions(
        UnitRecord("conv4", 1)) == ()
    assert Judged(RED, rec.labels, 0.4).correct() and not Judged(RED, ()).correct()


def test_rank_only_orders_the_candidates_by_their_rank_score_alone():
    from dnd.record import Selection

    # "red star" won on the final score (its image-product weight); "red" has the best
    # rank score; "ring" ties with it and keeps its place after it (summariser order)
    sel = Selection(candidates=("red star", "red", "ring", "blue"), rank_score_name="mean",
                    beta=1, k=1, image_candidate=(0, 1, 2, 3), activations=(3., 4., 4., 0.),
                    ranks=(3., 1.5, 1.5, 4.), top_k=(1,), rank_scores=(9., 2.25, 2.25, 16.),
                    positions=(2, 0, 1, 3), weights=(.9, .1, .1, -1.),
                    final_scores=(1.8, .4, .3, -1.), order=(0, 1, 2, 3))
    rec = UnitRecord("conv4", 0, stage="labels",
                     scoring=Scoring(sel.labels, 0.3, selection=sel))
    assert by_rank_score(rec) == ("red", "ring", "red star")
    assert not Judged(RED, dnd_labels(rec)).correct()
    assert Judged(RED, by_rank_score(rec)).correct()
    assert by_rank_score(_record(1, labels=("red",))) == ()  # no selection recorded


def _fixture() -> list[Judged]:
    """Six units: per kind, Label 1 correct (strict): monosemantic 1/2, polysemantic 1/1,
    compositional 0/1 (1/1 keyword), textual 1/1, free 0/1."""
    return [
        Judged(RED, ("crimson blob", "red", "blue"), 0.9),           # ok; L2 ok, L3 no
        Judged(Truth("conv3", 0, "monosemantic", ("blue",)), ("circle",), 0.2),  # wrong
        Judged(CIRCLE_OR_STRIPES, ("stripes", "scarlet disc"), 0.8),  # ok; both; L2 ok
        Judged(BLUE_STRIPES, ("blue", "stripes", "square"), 0.7),     # keyword only
        Judged(TEXT, ("lettering",), 0.6),                           # ok
        Judged(Truth("conv4", 40, FREE, ("dotted",)), ("gray", "dots"), 0.1),  # wrong;
    ]                                                            # free L2 skipped


def test_per_kind_and_per_layer_aggregation():
    judged = _fixture()
    by_kind = label1_by(judged, lambda j: j.truth.kind)
    assert {k: (r.hits, r.n) for k, r in by_kind.items()} == {
        "monosemantic": (1, 2), "polysemantic": (1, 1), "compositional": (0, 1),
        "textual": (1, 1), FREE: (0, 1)}
    assert label1_by(judged, lambda j: j.truth.kind, KEYWORD)["compositional"].hits == 1
    by_layer = label1_by(judged, lambda j: j.truth.layer)
    assert (by_layer["conv4"].hits, by_layer["conv4"].n) == (2, 4)
    assert (by_layer["conv3"].hits, by_layer["conv3"].n) == (1, 2)
    assert Rate(3, 4).cell() == "3/4 (75%)" and Rate(0, 0).cell() == "-"


def test_polysemantic_recall_and_secondary_precision():
    judged = _fixture()
    assert polysemantic_recall(judged) == Rate(1, 1)
    # secondary labels of planted units: red (ok), blue (no), scarlet disc (ok),
    # stripes (ok: a part), square (no); the free unit's "dots" is skipped
    assert secondary_precision(judged) == Rate(3, 5)


def test_calibration_auroc_matches_a_hand_computation():
    # correct (strict): units with scores 0.9, 0.8, 0.6 correct; 0.2, 0.7, 0.1 wrong.
    # Pairs (correct, wrong) with the correct one higher: 0.9 beats all 3, 0.8 beats all 3,
    # 0.6 beats 0.2 and 0.1 -> 8 of 9.
    cal = calibration(_fixture(), STRICT)
    assert (cal.n, cal.correct, cal.unscored) == (6, 3, 0)
    assert cal.auroc == pytest.approx(8 / 9)
    # a tie between a correct and a wrong unit counts one half; unscored units are left out
    tied = [Judged(RED, ("red",), 0.5), Judged(RED, ("blue",), 0.5),
            Judged(RED, ("red",), 0.9), Judged(RED, ("blue",), None)]
    cal = calibration(tied)
    assert cal.auroc == pytest.approx((1 + 0.5) / 2) and cal.unscored == 1
    assert calibration([Judged(RED, ("red",), 0.3)]).auroc is None  # one class only


def test_calibration_interval_is_seeded_and_holds_the_estimate():
    judged = _fixture() * 4
    a, b = calibration(judged, n_boot=500, seed=3), calibration(judged, n_boot=500, seed=3)
    assert a == b and a.low <= a.auroc <= a.high and a.high <= 1


def test_bootstrap_interval_is_seeded_contains_the_estimate_and_separates():
    flags = [True] * 14 + [False] * 6
    r1, r2 = rate(flags, 2000, seed=0), rate(flags, 2000, seed=0)
    assert r1 == r2 and r1.low <= 0.7 <= r1.high and 0.4 < r1.low < r1.high < 0.95
    assert rate(flags, 2000, seed=0).cell() == f"14/20 (70%) [{100 * r1.low:.0f}, " \
                                               f"{100 * r1.high:.0f}]"
    # clearly different: full DnD right on 18 of 20 units where the ablation is right on 4
    full = [True] * 18 + [False] * 2
    ablation = [True] * 4 + [False] * 16
    d = paired_difference(full, ablation, 2000, seed=0)
    assert d.mean == pytest.approx(0.7) and d.low <= d.mean <= d.high and d.excludes_zero
    assert d.cell().endswith("\\*")
    # identical methods: the interval is [0, 0] and does not exclude 0
    same = paired_difference(full, full, 2000, seed=0)
    assert (same.mean, same.low, same.high, same.excludes_zero) == (0, 0, 0, False)
    # one unit apart out of 20: within resampling noise
    assert not paired_difference(full, [False] + full[1:], 2000, seed=0).excludes_zero
    with pytest.raises(ValueError, match="one length"):
        paired_difference(full, full[:3])


def test_most_common_concept_counts_every_concept_of_every_unit():
    assert most_common_concept([RED, CIRCLE_OR_STRIPES, BLUE_STRIPES]) == "striped"
    assert most_common_concept([]) == ""


def test_tables_from_judged_units():
    full = _fixture()
    worse = [Judged(j.truth, ("nothing",)) for j in full]
    lines = planted_tables({"DnD (consensus summariser)": full, "ablation": worse},
                           ["conv3", "conv4"], n_probe=300, n_boot=200, seed=0)
    text = "\n".join(lines)
    assert "4 planted units" not in text and "5 planted units" in text
    row = next(x for x in lines if x.startswith("| DnD (consensus summariser) | 1/2 (50%)"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # method, monosemantic, polysemantic, textual, compositional strict and keyword,
    # free, all planted
    assert cells[2].startswith("1/1 (100%)") and cells[4].startswith("0/1 (0%)")
    assert cells[5].startswith("1/1 (100%)") and cells[7].startswith("3/5 (60%)")
    assert "| ablation | 0/2 (0%)" in text
    assert "| DnD (consensus summariser) | 1/2 (50%) | 2/3 (67%) |" in text  # per layer
    assert "| monosemantic | 0/1 (0%) | 1/1 (100%) | 1/2 (50%) |" in text  # kind x layer
    # over-specific Label 1s: "stripes" on the red-circle-or-stripes unit is fine, "circle"
    # on the blue unit names a shape, "gray" on the dotted free unit names nothing
    assert "| DnD (consensus summariser) | 1/1 (100%) | 3/5 (60%) | 1/6 (17%) | 0 |" in text
    assert "| Label 1 correct, monosemantic | >= 90% | 1/2 (50%) | **no** |" in text
    assert "| polysemantic: both concepts in Labels 1-3 | >= 80% | 1/1 (100%) | yes |" in text
    assert "Label 1 correct, local" not in text  # no local unit here
    with pytest.raises(ValueError, match="'ablation' is judged on other units"):
        planted_tables({"a": full, "ablation": worse[:2]}, ["conv4"], n_probe=1)


def test_calibration_pools_the_rows_with_a_confidence():
    """A row whose Labels 1 are all right has no AUROC; pooled with a row that has wrong
    ones, the confidence is ranked over both (a paper-rule row, without one, stays out)."""
    full = _fixture()
    right = [Judged(j.truth, (" ".join(j.truth.concepts) if j.truth.kind == "compositional"
                              else j.truth.concepts[0],), 0.5, 0.9) for j in full]
    wrong = [Judged(j.truth, ("nothing",), 0.5, 0.2) for j in full]
    paper = [Judged(j.truth, ("nothing",), 0.5) for j in full]
    text = "\n".join(planted_tables({"a": right, "b": wrong, "paper": paper},
                                    ["conv3", "conv4"], n_probe=1, n_boot=50,
                                    dnd_rows=("a", "b", "paper")))
    assert "| a | - (5/5 correct) | - (6/6 correct) |" in text
    assert "| pooled: the 2 rows above with a confidence | 1.00 [1.00, 1.00] (5/10 correct) " \
           "| 1.00 [1.00, 1.00] (6/12 correct) |" in text


def test_tables_say_which_rows_differ_beyond_resampling_noise():
    full = _fixture() * 4  # 20 planted units, 12 of them right (strict)
    worse = [Judged(j.truth, ("nothing",)) for j in full]
    text = "\n".join(planted_tables({"full": full, "ablation": worse}, ["conv3", "conv4"],
                                    n_probe=300, n_boot=500, seed=0))
    worse_line = next(x for x in text.splitlines() if x.startswith("Measurably worse than full"))
    assert "ablation on polysemantic (+100 [+100, +100])" in worse_line  # 4 of 4 vs 0
    assert "ablation on all planted (+60" in worse_line
    assert "ablation on compositional" not in worse_line  # both wrong (strict): no gap
    assert "Measurably better" not in text
    text = "\n".join(planted_tables({"ablation": worse, "full": full}, ["conv3", "conv4"],
                                    n_probe=300, n_boot=500, seed=0))
    assert "No row is measurably worse than ablation" in text
    better = next(x for x in text.splitlines() if x.startswith("Measurably better than"))
    assert "full on all planted (-60" in better


def test_other_concepts_measure_how_over_specific_a_label_is():
    caption = "a blue square on a striped gray background"
    assert other_concepts(caption, BLUE_STRIPES) == ("square",)
    assert other_concepts(caption, RED) == ("square", "blue", "striped")
    assert other_concepts("crimson disc and lines", CIRCLE_OR_STRIPES) == ()
    assert Judged(RED, (caption,)).over_specific and not Judged(RED, ("red",)).over_specific
    assert not Judged(RED, ()).over_specific


def test_weights_trained_for_other_planted_units_are_refused(tmp_path, caplog):
    import json

    from dnd.toyworld.planted import PLANTED

    units = [{"layer": u.layer, "unit": u.unit, "kind": u.kind, "concepts": list(u.concepts)}
             for u in PLANTED]
    weights = tmp_path / "toy_planted.safetensors"  # never read: only its .json is
    (tmp_path / "toy_planted.json").write_text(json.dumps({"training": {"planted_units": units}}))
    check_trained_for_planted(str(weights))
    units[-1] = dict(units[-1], concepts=["green", "plain"])
    (tmp_path / "toy_planted.json").write_text(json.dumps({"training": {"planted_units": units}}))
    with pytest.raises(ValueError, match="trained for other planted units.*retrain"):
        check_trained_for_planted(str(weights))
    (tmp_path / "toy_planted.json").unlink()
    check_trained_for_planted(str(weights))
    assert "not checked against PLANTED" in caplog.text


def test_demo_short_version_describes_and_judges_the_planted_units(tmp_path):
    """`dnd demo`'s planted table from a real (small) run: one row per method, one column
    per kind of conv4's planted units, counts that add up; a re-run resumes."""
    from dnd.benchmarks.planted import FULL, NO_SELECTION, RANK_ONLY, planted_demo
    from dnd.toyworld.planted import units_of

    lines = planted_demo(tmp_path, n_probe=300)
    header, _, *rows = lines[2:]
    kinds = [k.strip() for k in header.strip("|").split("|")][1:-1]
    count = {k: sum(u.kind == k for u in units_of("conv4")) for k in kinds}
    assert kinds == ["monosemantic", "polysemantic", "local", "textual", "compositional"]
    assert [r.split("|")[1].strip() for r in rows] == [FULL, NO_SELECTION, RANK_ONLY]
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")][1:]
        hits = [int(c.split("/")[0]) for c in cells]
        assert [int(c.split("/")[1].split()[0]) for c in cells] == [*count.values(), 19]
        assert sum(hits[:-1]) == hits[-1]
    # the polysemantic units are named by a working pipeline
    assert int(rows[0].split("|")[3].strip().split("/")[0]) >= 3
    assert planted_demo(tmp_path, n_probe=300) == lines  # resumed from the records


def test_the_reference_settings_on_every_channel_get_their_section_and_goals():
    """The every-channel run is judged on more units than the rows (no pairing needed) and
    its confidence AUROC and over-specific share are goals of their own."""
    full = _fixture()
    wrong_free = Judged(Truth("conv4", 40, FREE, ("dotted",)), ("red star",), 0.5, 0.1)
    every = [Judged(j.truth, j.labels, 0.5, 0.9 if j.correct() else 0.3) for j in full]
    every += [wrong_free, Judged(Truth("conv4", 41, FREE, ("ring",)), ("ring",), 0.5, 0.8)]
    text = "\n".join(planted_tables({"DnD (consensus summariser)": full}, ["conv3", "conv4"],
                                    n_probe=1, every=every, every_described=9))
    assert "### DnD (consensus summariser), every channel of the layers" in text
    assert "on all 9 channels of conv3, conv4" in text
    # 4 of 8 right: 3 planted, the ring; "red star" and "circle" name what the unit lacks
    assert "| 8 | 3/5 (60%) | 1/3 (33%) | 2/8 (25%) | 1.00 [1.00, 1.00] (4/8 correct) |" in text
    assert ("| confidence AUROC (all judged units) (DnD (consensus summariser), every channel "
            "of the layers) | >= 0.85 | 1.00 [1.00, 1.00] (4/8 correct) | yes |") in text
    assert "| Label 1 over-specific (DnD (consensus summariser), every channel of the layers)" \
        in text
    assert "every channel" not in "\n".join(planted_tables(
        {"DnD (consensus summariser)": full}, ["conv3", "conv4"], n_probe=1))
