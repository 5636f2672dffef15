"""Unit description files, in the two layouts the evaluation suites read.

- ``Neuron ID,Label 1,Label 2,Label 3``: the reference layout, ``labels.csv`` of a dnd run
  (one layer per file, so the layer is given by the caller). Empty label cells are dropped.
- ``layer,unit,description``: one description per row, any number of layers per file.

Both become a list of :class:`UnitLabels`, in file order.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

REFERENCE_HEADER = ("Neuron ID", "Label 1")
LAYERED_HEADER = ("layer", "unit", "description")


class LabelFileError(ValueError):
    """A description file cannot be read; the message names the file and the bad row."""


@dataclass(frozen=True)
class UnitLabels:
    """One unit's labels, best first (``labels[0]`` is its description)."""

    layer: str | None
    unit: int
    labels: tuple[str, ...]

    @property
    def description(self) -> str:
        return self.labels[0]


def read_labels(path: str | Path, layer: str | None = None) -> list[UnitLabels]:
    """Read a description file of either layout (see the module docstring).

    ``layer`` names the layer of a reference-layout file, whose rows carry none; for the
    ``layer,unit,description`` layout it keeps only that layer's rows when given.
    Raises :class:`LabelFileError` naming the file and row on a bad header, unit id or an
    empty description, and on a unit listed twice.
    """
    path = Path(path)
    if not path.is_file():
        raise LabelFileError(f"label file not found: {path}")
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise LabelFileError(f"{path}: empty file, expected a header row")
    header = [h.strip() for h in rows[0]]
    if tuple(header[:2]) == REFERENCE_HEADER:
        units = [_reference_row(path, k, row, layer) for k, row in enumerate(rows[1:], 2)
                 if any(c.strip() for c in row)]
    elif tuple(header[:3]) == LAYERED_HEADER:
        units = [_layered_row(path, k, row) for k, row in enumerate(rows[1:], 2)
                 if any(c.strip() for c in row)]
        if layer is not None:
            units = [u for u in units if u.layer == layer]
    else:
        raise LabelFileError(
            f"{path}: unknown header {','.join(header)!r}; expected "
            f"'Neuron ID,Label 1,Label 2,Label 3' or 'layer,unit,description'")
    seen: set[tuple[str | None, int]] = set()
    for u in units:
        if (u.layer, u.unit) in seen:
            raise LabelFileError(f"{path}: unit {u.unit} of layer {u.layer} is listed twice")
        seen.add((u.layer, u.unit))
    return units


def _unit_id(path: Path, line: int, cell: str) -> int:
    try:
        unit = int(cell.strip())
    except ValueError:
        raise LabelFileError(f"{path}, row {line}: unit id {cell!r} is not an integer") from None
    if unit < 0:
        raise LabelFileError(f"{path}, row {line}: unit id {unit} is negative")
    return unit


def _reference_row(path: Path, line: int, row: list[str], layer: str | None) -> UnitLabels:
    labels = tuple(c.strip() for c in row[1:] if c.strip())
    if not labels:
        raise LabelFileError(f"{path}, row {line}: no label for unit {row[0]!r}")
    return UnitLabels(layer, _unit_id(path, line, row[0]), labels)


def _layered_row(path: Path, line: int, row: list[str]) -> UnitLabels:
    if len(row) < 3 or not row[0].strip() or not row[2].strip():
        raise LabelFileError(f"{path}, row {line}: need layer,unit,description, got {row!r}")
    return UnitLabels(row[0].strip(), _unit_id(path, line, row[1]), (row[2].strip(),))
