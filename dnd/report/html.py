"""The report's HTML pieces shared by its pages (and by other pages in the report's
style: ``dnd explain``'s, the benchmarks' comparison pages): escaping, numbers, the page
skeleton, an image tag."""

from __future__ import annotations

import html
import json
from typing import Any

from dnd.report.assets import CSS


def esc(value: Any) -> str:
    """HTML-escaped text of any value (None as an empty string)."""
    return html.escape("" if value is None else str(value))


def script_json(value: Any) -> str:
    """JSON safe inside <script>: no '</script>', '<!--' or entity can end or alter it."""
    return (json.dumps(value, ensure_ascii=False).replace("&", "\\u0026")
            .replace("<", "\\u003c").replace(">", "\\u003e"))


def num(x: Any, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else esc(x)


def page(title: str, body: str) -> str:
    """A whole HTML page in the report's style."""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>{esc(title)}</title><style>{CSS}</style></head>\n<body>{body}</body></html>\n")


def img(rel: str | None, up: str, alt: str = "") -> str:
    """An ``<img>`` of ``rel`` (a path relative to report/, ``up`` leading back there), or
    a grey placeholder for a missing image."""
    if rel is None:
        return '<div class=noimg style="width:160px;height:160px;background:#eee"></div>'
    return f'<img src="{esc(up + rel)}" alt="{esc(alt)}" loading="lazy">'
