"""Unit description files, in the layouts methods publish them.

The header row names the columns; names match case-insensitively, ignoring spaces around
them and ``_`` / ``-`` versus a space:

- unit id (required): ``Neuron ID``, ``neuron``, ``unit`` or ``unit id``;
- labels (at least one), best first in file order: ``label``, ``Label 1``, ``Label 2``, ...,
  ``labels``, ``description``, ``summary``, ``concept``;
- ``layer`` (optional): files without it hold one layer, named by the caller.

Other columns (a similarity score, say) are ignored. So ``Neuron ID,Label 1,Label 2,Label 3``
(``labels.csv`` of a dnd run), ``Neuron ID,label`` (the reference implementation's
final-layer files) and ``layer,unit,description`` (MILAN, CLIP-Dissect) all read. Files are
UTF-8 with or without a byte-order mark, with LF or CRLF line ends.

Empty label cells at the end of a row are dropped; an empty one before a set one is an error
(the second-best label would silently become the description). Every file becomes a list of
:class:`UnitLabels`, in file order.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from pathlib import Path

UNIT_COLUMNS = ("neuron id", "neuron", "unit", "unit id")
_LABEL_COLUMN = re.compile(r"(label|labels|description|summary|concept)( \d+)?")
EXPECTED_HEADERS = ("'Neuron ID,Label 1,Label 2,Label 3', 'Neuron ID,label' or "
                    "'layer,unit,description'")


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


@dataclass(frozen=True)
class Columns:
    """Column indices found in a header row (see the module docstring)."""

    unit: int
    labels: tuple[int, ...]
    layer: int | None
    names: tuple[str, ...]  # the header as written, stripped


def read_csv_rows(path: str | Path, what: str = "label file") -> list[list[str]]:
    """Rows of a UTF-8 CSV (BOM optional, LF or CRLF). Raises :class:`LabelFileError`
    naming the file when it is missing, empty or in another encoding."""
    path = Path(path)
    if not path.is_file():
        raise LabelFileError(f"{what} not found: {path}")
    raw = path.read_bytes()
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise LabelFileError(f"{path} is UTF-16 text; expected UTF-8 (with or without a "
                             f"BOM): save it as UTF-8")
    try:
        text = raw.decode("utf-8-sig")  # drops a leading BOM if there is one
    except UnicodeDecodeError as e:
        raise LabelFileError(
            f"{path} is not UTF-8: byte 0x{raw[e.start]:02x} at offset {e.start} is not "
            f"valid UTF-8 (a latin-1 or Windows-1252 file?); expected UTF-8 (with or without "
            f"a BOM): save it as UTF-8") from None
    rows = list(csv.reader(io.StringIO(text, newline="")))
    if not rows:
        raise LabelFileError(f"{path}: empty file, expected a header row")
    return rows


def find_columns(path: Path, header: list[str], expected: str = EXPECTED_HEADERS) -> Columns:
    """Locate the unit, label and layer columns of ``header``; raises
    :class:`LabelFileError` naming the file and the accepted headers when one is missing."""
    names = tuple(h.strip() for h in header)
    norm = [" ".join(re.sub(r"[_-]", " ", h).lower().split()) for h in names]
    unit = next((i for i, h in enumerate(norm) if h in UNIT_COLUMNS), None)
    labels = tuple(i for i, h in enumerate(norm) if _LABEL_COLUMN.fullmatch(h))
    layer = next((i for i, h in enumerate(norm) if h == "layer"), None)
    if unit is None or not labels:
        lacks = "unit id" if unit is None else "label"
        raise LabelFileError(f"{path}: unknown header {','.join(names)!r} (no {lacks} column); "
                             f"expected e.g. {expected}")
    return Columns(unit, labels, layer, names)


def read_labels(path: str | Path, layer: str | None = None, *,
                single_layer: bool = False) -> list[UnitLabels]:
    """Read a description file of any layout of the module docstring.

    ``layer``: for a file without a layer column, the layer its rows are of; for a file
    with one, keep only that layer's rows (an error listing the layers present when none
    match). ``single_layer``: the caller scores one layer (final layer, classifier
    search), so a file holding several layers with no ``layer`` given is an error listing
    them instead of a silent mix.
    Raises :class:`LabelFileError` naming the file and row on a bad header, encoding, unit
    id, a missing or out-of-order label, and on a unit listed twice.
    """
    path = Path(path)
    rows = read_csv_rows(path)
    cols = find_columns(path, rows[0])
    units = [_row(path, k, row, cols, layer) for k, row in enumerate(rows[1:], 2)
             if any(c.strip() for c in row)]
    if cols.layer is not None:
        present = list(dict.fromkeys(u.layer for u in units))
        if layer is not None:
            units = [u for u in units if u.layer == layer]
            if not units:
                raise LabelFileError(f"{path}: no row of layer {layer!r}; layers present: "
                                     f"{', '.join(map(str, present)) or 'none (no rows)'}")
        elif single_layer and len(present) > 1:
            raise LabelFileError(f"{path} holds {len(present)} layers "
                                 f"({', '.join(map(str, present))}): pick one with --layer")
    seen: set[tuple[str | None, int]] = set()
    for u in units:
        if (u.layer, u.unit) in seen:
            raise LabelFileError(f"{path}: unit {u.unit} of layer {u.layer} is listed twice")
        seen.add((u.layer, u.unit))
    return units


def _cell(row: list[str], i: int) -> str:
    return row[i].strip() if i < len(row) else ""


def _unit_id(path: Path, line: int, cell: str) -> int:
    try:
        unit = int(cell.strip())
    except ValueError:
        raise LabelFileError(f"{path}, row {line}: unit id {cell!r} is not an integer") from None
    if unit < 0:
        raise LabelFileError(f"{path}, row {line}: unit id {unit} is negative")
    return unit


def _row(path: Path, line: int, row: list[str], cols: Columns,
         layer: str | None) -> UnitLabels:
    if cols.layer is not None:
        layer = _cell(row, cols.layer)
        if not layer:
            raise LabelFileError(f"{path}, row {line}: empty {cols.names[cols.layer]!r} "
                                 f"cell, got {row!r}")
    unit = _unit_id(path, line, _cell(row, cols.unit))
    cells = [_cell(row, i) for i in cols.labels]
    if not any(cells):
        raise LabelFileError(f"{path}, row {line}: no label for unit {unit}")
    last = max(i for i, c in enumerate(cells) if c)
    gap = next((i for i in range(last) if not cells[i]), None)
    if gap is not None:
        raise LabelFileError(
            f"{path}, row {line}: {cols.names[cols.labels[gap]]!r} is blank but "
            f"{cols.names[cols.labels[last]]!r} is set for unit {unit}; fill it or move the "
            f"labels left (labels are best first)")
    return UnitLabels(layer, unit, tuple(cells[:last + 1]))
