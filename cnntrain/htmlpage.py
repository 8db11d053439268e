"""One self-contained HTML page (the `report.html` of html_report.py): the template and its
assets (cnntrain/html/, package data), the building blocks (metric tables, sortable tables, a
confusion-matrix heat map, inline PNG figures, charts) and the page's security.

Everything is inside the page: CSS, scripts and the figures (base64 `data:` images), so it opens
from disk and can be mailed or attached as one file. The charts are drawn by uPlot (MIT,
vendored in cnntrain/html/ with its licence; see html_report.py for why), in the browser, from
numbers that the page holds in a JSON block: writing the page costs milliseconds, no figure is
rendered, so training rewrites it every epoch.

Security: every string from a config, a file or a folder name (class names, run names, swept
overrides) is data. Text goes through `esc` (visible characters, then HTML-escaped), the JSON
block cannot close its <script> element (`<`, `>` and `&` are \\u escapes), and the page's
Content-Security-Policy lets nothing load (`default-src 'none'`, images only from `data:`) and
runs only the page's own two scripts (their sha256 hashes): an injected `<script>` or `onerror=`
would not run even if escaping failed somewhere."""

from __future__ import annotations

import base64
import datetime
import hashlib
import html
import importlib.resources
import json
import math
import string
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from cnntrain.files import irregular
from cnntrain.text import visible

UPLOT_VERSION = "1.6.32"  # cnntrain/html/uPlot.*: `npm pack uplot@1.6.32`, dist/ files as released
MAX_IMAGE_BYTES = 32 << 20  # a PNG larger than this is left out (a page is read in a browser)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@lru_cache(maxsize=None)
def asset(name: str) -> str:
    """A file of cnntrain/html/ (read once per process)."""
    return (importlib.resources.files("cnntrain") / "html" / name).read_text(encoding="utf-8")


def esc(value) -> str:
    """`value` as HTML text or attribute value that shows exactly its characters: unprintable
    ones (a newline, ESC, a right-to-left override) as their escapes (text.visible), then
    `& < > " '` as entities."""
    text = str(value)
    return html.escape(text if text.isprintable() else visible(text), quote=True)


def _script_hash(script: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(script.encode()).digest()).decode() + "'"


def _json_block(data) -> str:
    """`data` as the text of a <script type="application/json"> element: no `</script>` or
    `<!--` can appear in it, and NaN/inf (which JSON.parse refuses) are null."""
    text = json.dumps(finite(data), ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def finite(value):
    """`value` with every NaN or infinite float (in lists and dicts too) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def number(value) -> float | int | None:
    """A number read from a file (JSON, CSV text), or None: bools, text and other types are not
    numbers here."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str) and value.strip():
        try:
            return float(value)
        except ValueError:
            return None
    return None


def fmt(value, spec: str = "{:.4f}") -> str:
    """A value for a cell: numbers through `spec` (a str.format pattern), None as empty."""
    if value is None:
        return ""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    try:
        return spec.format(value)
    except (ValueError, TypeError):  # "{:,}" of a float with a fraction, "{:d}" of a float...
        return str(value)


@dataclass(frozen=True)
class Metric:
    """One row of a metrics table: `key` in the results (a dotted path reaches into nested
    dicts: "calibration.temperature"), its label and format. A row shows only when its key
    holds a number, so a metric that only some runs have can be listed before it exists."""

    key: str
    label: str
    spec: str = "{:.4f}"


def lookup(data: dict, key: str):
    for part in key.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def numbers(data: dict, prefix: str = "") -> dict[str, float | int]:
    """Every number in `data` (nested dicts flattened to dotted keys; lists left out)."""
    found: dict[str, float | int] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            found.update(numbers(value, f"{name}."))
        elif number(value) is not None and not isinstance(value, str):
            found[name] = value
    return found


def metrics_table(data: dict, metrics, others: bool = True, skip=()) -> str:
    """The rows of `metrics` that `data` has; with `others`, then every other number in `data`
    under its own key (a metric a newer cnntrain writes shows before a row is made for it)."""
    rows = [
        (m.label, fmt(v, m.spec))
        for m in metrics
        if (v := number(lookup(data, m.key))) is not None
        and not isinstance(lookup(data, m.key), str)
    ]
    if others:
        known = {m.key for m in metrics} | set(skip)
        rows += [(k, fmt(v, "{:.4g}")) for k, v in numbers(data).items() if k not in known]
    if not rows:
        return ""
    body = "".join(
        f'<tr><td>{esc(label)}</td><td class="num">{esc(v)}</td></tr>' for label, v in rows
    )
    return f'<table class="metrics"><tbody>{body}</tbody></table>'


@dataclass(frozen=True)
class Column:
    """A column of `table`: the row key, its heading, the format of its numbers."""

    key: str
    label: str
    spec: str = "{:.4f}"


@dataclass(frozen=True)
class Link:
    """A cell holding a link (relative, e.g. to a job's report.html)."""

    text: str
    href: str


def _cell(value, spec: str, cls: str | None = None) -> str:
    if isinstance(value, Link):
        return f'<td><a href="{esc(value.href)}">{esc(value.text)}</a></td>'
    n = number(value) if not isinstance(value, str) else None
    classes = " ".join(c for c in ("num" if n is not None else "", cls or "") if c)
    attrs = f' class="{esc(classes)}"' if classes else ""
    if n is not None:
        sort = f' data-v="{n!r}"' if math.isfinite(n) else ""
        return f"<td{attrs}{sort}>{fmt(n, spec)}</td>"  # digits: nothing to escape
    return f"<td{attrs}>{esc(fmt(value, spec))}</td>"


def table(columns: list[Column], rows: list[dict], *, sortable: bool = True, classes=None) -> str:
    """A table of `rows` (dicts) under `columns`; numbers right-aligned, each cell's number in
    data-v for sorting (report.js sorts a `sortable` table by the heading clicked). `classes`:
    a function of (row, column key) giving a CSS class for that cell, or None."""
    head = "".join(f"<th>{esc(c.label)}</th>" for c in columns)
    body = [
        "<tr>"
        + "".join(
            _cell(row.get(c.key), c.spec, classes(row, c.key) if classes else None) for c in columns
        )
        + "</tr>"
        for row in rows
    ]
    sort = ' class="sortable"' if sortable else ""
    return (
        f'<div class="scroll"><table{sort}><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


def confusion_table(matrix: list[list], classes: list[str]) -> str:
    """The confusion matrix (rows = true class, columns = predicted) as a heat map: each cell
    its count, coloured by its fraction of the row, the diagonal outlined."""
    head = "".join(f'<th class="pred" title="predicted {esc(c)}">{esc(c)}</th>' for c in classes)
    rows = []
    for i, (name, row) in enumerate(zip(classes, matrix)):
        counts = [number(v) or 0 for v in row]
        total = sum(counts) or 1
        cells = []
        for j, (predicted, count) in enumerate(zip(classes, counts)):
            share = count / total
            cls = " ".join(
                c for c in ("diag" if i == j else "", "dark" if share > 0.5 else "") if c
            )
            cells.append(
                f'<td class="{cls}" style="background: rgba(31,119,180,{share:.3f})" '
                f'title="true {esc(name)}, predicted {esc(predicted)}: {count:g} '
                f'({share:.1%} of the row)">{count:g}</td>'
            )
        rows.append(f"<tr><th>{esc(name)}</th>{''.join(cells)}</tr>")
    return (
        '<div class="scroll"><table class="confusion"><thead><tr>'
        f"<th>true \\ predicted</th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>"
    )


def png(path: Path, alt: str) -> str:
    """`path` inlined as an <img> if it is a PNG file (not too large), else ""."""
    path = Path(path)
    try:
        if irregular(path) or not path.is_file() or path.stat().st_size > MAX_IMAGE_BYTES:
            return ""
        data = path.read_bytes()
    except OSError:
        return ""
    if not data.startswith(PNG_SIGNATURE):
        return ""
    b64 = base64.b64encode(data).decode()
    return f'<img class="figure" src="data:image/png;base64,{b64}" alt="{esc(alt)}">'


def read_json(path: Path) -> dict | None:
    """A JSON object from `path`, or None when it is missing, not a regular file or not a JSON
    object: a report shows what it can of a folder."""
    path = Path(path)
    try:
        if irregular(path) or not path.is_file():
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class Page:
    """A report page being put together: sections (each in the page's navigation), charts."""

    def __init__(self, title: str, subtitle: str = ""):
        self.title, self.subtitle = title, subtitle
        self.sections: list[tuple[str, str, str]] = []
        self.charts: list[dict] = []

    def section(self, anchor: str, heading: str, body: str) -> None:
        if body:
            self.sections.append((anchor, heading, body))

    def chart(
        self,
        title: str,
        x: list,
        series: list[dict],
        xlabel: str,
        ylabel: str,
        *,
        whole_x=True,
        wide=False,
    ) -> str:
        """A <div> that report.js draws a line chart into: `series` are dicts of label, values
        (one per x, None for a gap) and optionally color. Series without a value are left out;
        "" when none is left."""
        series = [s for s in series if any(v is not None for v in finite(s["values"]))]
        if not series or not x:
            return ""
        anchor = f"chart{len(self.charts)}"
        self.charts.append(
            {
                "id": anchor,
                "title": title,
                "x": x,
                "series": series,
                "xlabel": xlabel,
                "ylabel": ylabel,
                "whole": whole_x,
            }
        )
        return f'<div class="chart{" wide" if wide else ""}" id="{anchor}"></div>'

    def render(self, *, reload_s: int | None = None) -> str:
        """The whole page. `reload_s`: the browser reloads it that often (a run still going)."""
        uplot, js = asset("uPlot.iife.min.js"), asset("report.js")
        csp = (
            "default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
            f"script-src {_script_hash(uplot)} {_script_hash(js)}; base-uri 'none'; form-action 'none'"
        )
        nav = "".join(f'<a href="#{esc(a)}">{esc(h)}</a>' for a, h, _ in self.sections)
        sections = "\n".join(
            f'<section id="{esc(a)}"><h2>{esc(h)}</h2>\n{body}\n</section>'
            for a, h, body in self.sections
        )
        refresh = f'<meta http-equiv="refresh" content="{int(reload_s)}">\n' if reload_s else ""
        return string.Template(asset("page.html")).substitute(
            csp=csp,
            refresh=refresh,
            title=esc(self.title),
            heading=esc(self.title),
            subtitle=f'<p class="sub">{self.subtitle}</p>' if self.subtitle else "",
            nav=nav,
            sections=sections,
            written=esc(datetime.datetime.now().strftime("%Y-%m-%d at %H:%M:%S")),
            uplot_version=UPLOT_VERSION,
            uplot_css=asset("uPlot.min.css"),
            css=asset("report.css"),
            data=_json_block({"charts": self.charts}),
            uplot=uplot,
            js=js,
        )
