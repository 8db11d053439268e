"""`report.html`: one self-contained page (htmlpage.py) for a training run, a cnneval evaluation
and a sweep, to open from disk and share without a server.

- training run: `<run>/report.html` (RunReport), written by tracking.RunTracker after every
  epoch and at the end with the test result: the result, curves, the per-epoch table (the rows
  of metrics.csv), the test confusion matrix, the model summary and the config;
- cnneval: `report.html` beside report.json (`write_eval_report`, reading the folder): the
  metrics, the per-class table, the confusion matrix, and the figures cnneval saved there
  (reliability.png, misclassified.png);
- sweep: `<sweep>/report.html` beside summary.md (`write_sweep_report`, callbacks.SweepSummary):
  the summary table with a link to each job's report.html, and every job's val accuracy per
  epoch in one chart.

Charts are uPlot (github.com/leeoniya/uPlot, MIT; vendored in cnntrain/html/ with its licence)
rather than another matplotlib figure or hand-written SVG: a figure costs a render per epoch
(curves.png already does), a chart drawn in the browser from inline numbers costs nothing to
write. uPlot over Chart.js: it is made for exactly these numeric line series, is 51 kB minified
against about 200 kB (inlined into every page, rewritten every epoch, one per sweep job), has a
live legend giving every series' value under the cursor (a dozen sweep jobs compared at one
epoch), drag-to-zoom, and writes labels as text, never as HTML. Figures the project already
renders (cnneval's misclassified.png and, beyond 40 classes, confusion_matrix.png; the
calibration's reliability.png; the LR finder's lr_find.png) are inlined as they are.

A table or metric list is a declaration: to show a new metric, add a `Metric` (or `Column`)
line below; a number a newer cnntrain writes into results.json or report.json shows under its
own key until then. Keys are looked up, never required: the page shows what the folder has."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import yaml

from cnntrain.files import irregular, write_text
from cnntrain.htmlpage import (
    Column,
    Link,
    Metric,
    Page,
    confusion_table,
    esc,
    fmt,
    metrics_table,
    number,
    png,
    read_json,
    table,
)

REPORT = "report.html"
RELOAD_S = 30  # a running training's page reloads itself this often
MAX_MATRIX_CLASSES = 40  # beyond this a confusion matrix in a table is unreadable: the PNG

# results.json of a training run
RUN_METRICS = (
    Metric("test_acc", "test accuracy (best.pt)"),
    Metric("test_top5", "test top-5 accuracy"),
    Metric("macro_f1", "macro-F1"),
    Metric("balanced_acc", "balanced accuracy"),
    Metric("test_macro_f1", "test macro-F1"),
    Metric("test_balanced_acc", "test balanced accuracy"),
    Metric("test_loss", "test loss"),
    Metric("best_val_acc", "best val accuracy"),
    Metric("best_epoch", "best epoch", "{}"),
    Metric("epochs_run", "epochs run", "{}"),
    Metric("epochs", "epochs configured", "{}"),
    Metric("test_images", "test images", "{:,}"),
    Metric("train_time_s", "training time (s)", "{:.1f}"),
    Metric("params", "parameters", "{:,}"),
    Metric("trainable_params", "trainable parameters", "{:,}"),
    Metric("macs", "MACs per image", "{:,}"),
    Metric("test_ece", "test ECE (15 bins)"),
)
# report.json of cnneval
EVAL_METRICS = (
    Metric("top1", "top-1 accuracy"),
    Metric("top5", "top-5 accuracy"),
    Metric("macro_f1", "macro-F1"),
    Metric("balanced_acc", "balanced accuracy"),
    Metric("loss", "loss (cross-entropy)"),
    Metric("calibration.ece", "ECE (expected calibration error, 15 bins)"),
    Metric("calibration.nll", "NLL (negative log-likelihood)"),
    Metric("calibration.brier", "Brier score"),
    Metric("calibration.temperature", "temperature (softmax(logits / T))", "{:.4g}"),
    Metric("calibration.calibrated.temperature", "fitted temperature (calibrate=true)", "{:.4g}"),
    Metric("calibration.calibrated.ece", "ECE after temperature scaling"),
    Metric("calibration.calibrated.nll", "NLL after temperature scaling"),
    Metric("calibration.calibrated.brier", "Brier score after temperature scaling"),
    Metric("calibration.calibrated.val_nll_before", "val NLL before the fit (the fit's split)"),
    Metric("calibration.calibrated.val_nll_after", "val NLL after the fit"),
    Metric("calibration.calibrated.fit_samples", "images the temperature was fit on", "{:,}"),
    Metric("calibration.bins", "calibration bins", "{}"),
    Metric("num_samples", "images", "{:,}"),
)
# metrics.csv (tracking.COLUMNS); a column not named here is shown with 4 significant digits
EPOCH_FORMATS = {"epoch": "{}", "lr": "{:.4g}", "time": "{:.1f}", "img_per_s": "{:.0f}"}
EPOCH_LABELS = {"time": "time (s)", "img_per_s": "img/s"}
PER_CLASS_FORMATS = {"support": "{:,}"}
SWEEP_COLUMNS = (
    Column("job", "job"),
    Column("swept", "swept"),
    Column("status", "status"),
    Column("test_acc", "test acc"),
    Column("best_val_acc", "best val acc"),
    Column("macro_f1", "macro-F1"),
    Column("balanced_acc", "balanced acc"),
    Column("best_epoch", "best epoch", "{}"),
    Column("epochs", "epochs", "{}"),
    Column("params", "params", "{:,}"),
    Column("train_time_s", "train time (s)", "{:.1f}"),
    Column("problem", "error / note"),
)
CURVES = (("loss", "loss"), ("acc", "accuracy"))  # metrics.csv's <split>_<metric> columns


def _epoch_table(history: list[dict]) -> str:
    keys = [
        k
        for k in dict.fromkeys(k for row in history for k in row)
        if any(r.get(k) is not None for r in history)
    ]
    columns = [Column(k, EPOCH_LABELS.get(k, k), EPOCH_FORMATS.get(k, "{:.4f}")) for k in keys]
    return table(columns, history)


def _curves(page: Page, history: list[dict]) -> str:
    """The charts of curves.png: loss and accuracy (train and val) and the lr, per epoch."""
    x = [number(r.get("epoch")) for r in history]
    charts = [
        page.chart(
            label,
            x,
            [
                {"label": split, "values": [number(r.get(f"{split}_{metric}")) for r in history]}
                for split in ("train", "val")
            ],
            "epoch",
            label,
        )
        for metric, label in CURVES
    ]
    lr = [{"label": "lr", "values": [number(r.get("lr")) for r in history], "color": "#2ca02c"}]
    charts.append(page.chart("learning rate (start of epoch)", x, lr, "epoch", "lr"))
    return f'<div class="charts">{"".join(charts)}</div>' if any(charts) else ""


def _summary_html(info: dict | None) -> str:
    """The model summary (summary.summarize): a row per layer or block, then the totals."""
    if not info:
        return ""

    def shape(dims):
        return "x".join(str(d) for d in dims) if dims else "-"

    rows = [{"name": "input", "type": "", "output": shape(info.get("input")), "params": None}]
    rows += [{**r, "output": shape(r.get("output"))} for r in info.get("stages", [])]
    columns = [
        Column("name", "layer / block"),
        Column("type", "type"),
        Column("output", "output"),
        Column("params", "params", "{:,}"),
    ]
    totals = (
        f"{fmt(info.get('params'), '{:,}')} parameters ({fmt(info.get('trainable'), '{:,}')} "
        f"trainable), {fmt(info.get('macs'), '{:,}')} MACs per image"
    )
    return f'<p class="note">{esc(totals)}</p>' + table(columns, rows, sortable=False)


def _config_html(config: dict | None, run_dir: Path) -> str:
    overrides = _overrides(run_dir)
    parts = []
    if overrides:
        parts.append(f"<p>Command-line overrides: <code>{esc(' '.join(overrides))}</code></p>")
    if config:
        text = yaml.dump(
            config, Dumper=_ConfigDumper, sort_keys=False, allow_unicode=True, width=100
        )
        parts.append(f"<pre>{esc_block(text)}</pre>")
    return "".join(parts)


class _ConfigDumper(yaml.SafeDumper):
    """Sections as blocks, lists of plain values on one line (`mean: [0.2877]`), as the config
    files are written."""


_ConfigDumper.add_representer(
    list,
    lambda dumper, data: dumper.represent_sequence(
        "tag:yaml.org,2002:seq",
        data,
        flow_style=all(not isinstance(v, (dict, list)) for v in data),
    ),
)


def esc_block(text: str) -> str:
    """Multi-line text for a <pre>: each line through esc, the line breaks kept."""
    return "\n".join(esc(line) for line in text.splitlines())


def _overrides(folder: Path) -> list[str]:
    path = Path(folder) / ".hydra" / "overrides.yaml"
    try:
        if irregular(path) or not path.is_file():
            return []
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return []
    return [str(o) for o in data] if isinstance(data, list) else []


def _confusion(matrix, classes, folder: Path | None = None) -> str:
    """The matrix as a heat-map table, or beyond MAX_MATRIX_CLASSES classes the PNG cnneval
    drew (or a note)."""
    if not isinstance(matrix, list) or not isinstance(classes, list) or len(matrix) != len(classes):
        return ""
    if len(classes) <= MAX_MATRIX_CLASSES:
        return (
            '<p class="note">Rows: the true class; columns: the predicted class; colour: the share of the row.</p>'
            + confusion_table(matrix, classes)
        )
    image = png(folder / "confusion_matrix.png", "confusion matrix") if folder else ""
    return image or f'<p class="note">{len(classes)} classes: too many for a table here.</p>'


class RunReport:
    """report.html of a training run. The parts fixed for the run (model summary, config) are
    rendered once; `write` adds the epochs so far and, at the end, the test result."""

    def __init__(
        self,
        run_dir: Path,
        title: str,
        *,
        config: dict | None = None,
        summary: dict | None = None,
        epochs: int | None = None,
    ):
        self.run_dir, self.title, self.epochs = Path(run_dir), title, epochs
        self.summary = _summary_html(summary)
        self.config = _config_html(config, self.run_dir)

    def write(
        self,
        history: list[dict],
        results: dict | None = None,
        confusion=None,
        classes=None,
        *,
        stopped: str | None = None,
    ) -> None:
        """The page after the epochs of `history`; `results` (and the test confusion matrix)
        once the run has finished, or `stopped`: why it stopped before that."""
        page = self.render(history, results, confusion, classes, stopped=stopped)
        write_text(self.run_dir / REPORT, page)

    def render(self, history, results=None, confusion=None, classes=None, *, stopped=None) -> str:
        going = results is None and stopped is None
        page = Page(self.title, self._status(history, results, stopped))
        if stopped:
            page.section("stopped", "Stopped", f'<p class="warn">{esc(stopped)}</p>')
        page.section("result", "Test result", _run_result(results, going))
        page.section("curves", "Curves", _curves(page, history) + _lr_find(self.run_dir))
        page.section("epochs", "Epochs (metrics.csv)", _epoch_table(history) if history else "")
        if confusion is not None and classes is not None:
            matrix = confusion.tolist() if hasattr(confusion, "tolist") else confusion
            page.section(
                "confusion", "Test confusion matrix (best.pt)", _confusion(matrix, list(classes))
            )
        page.section("model", "Model summary", self.summary)
        page.section("config", "Config", self.config)
        return page.render(reload_s=RELOAD_S if going else None)

    def _status(self, history: list[dict], results, stopped) -> str:
        done = esc(history[-1].get("epoch") if history else 0)
        of = f" of {esc(self.epochs)}" if self.epochs else ""
        folder = esc("/".join(self.run_dir.parts[-2:]))
        if stopped:
            status = f'<span class="running">stopped after epoch {done}{of}</span>'
        elif results is None:
            status = (
                f'<span class="running">running: epoch {done}{of} done</span> '
                f"(this page reloads every {RELOAD_S} s)"
            )
        else:
            status = f"finished: {done}{of} epochs"
        return f"{folder} &middot; {status}"


def _lr_find(run_dir: Path) -> str:
    """The learning-rate finder's plot and the numbers of its lr_find.json, when the run has
    them."""
    image = png(run_dir / "lr_find.png", "learning-rate finder")
    found = read_json(run_dir / "lr_find.json")
    numbers = metrics_table(found, ()) if found else ""
    return f"<h3>Learning-rate finder</h3>{numbers}{image}" if image or numbers else ""


def _run_result(results: dict | None, going: bool) -> str:
    if results is None:
        return (
            '<p class="note">The test accuracy of best.pt is measured when training ends.</p>'
            if going
            else ""
        )
    notes = []
    if results.get("test_acc") is None:
        notes.append('<p class="note">No test split: no test score.</p>')
    if results.get("test_capped"):
        notes.append(
            '<p class="warn">The test ran on part of the test split only (max_eval_steps): a quick look, not the test score; run cnneval on best.pt for that.</p>'
        )
    if results.get("val_at_chance"):
        notes.append(
            '<p class="warn">The best epoch validates at chance while train accuracy rose: BatchNorm statistics not settled (few steps?) or val data unlike train.</p>'
        )
    return metrics_table(results, RUN_METRICS) + "".join(notes)


def write_eval_report(folder: Path) -> Path | None:
    """report.html beside the report.json in `folder` (cnneval's), with the figures found there;
    None (nothing written) when there is no readable report.json."""
    folder = Path(folder)
    report = read_json(folder / "report.json")
    if report is None:
        return None
    write_text(folder / REPORT, render_eval_report(report, folder))
    return folder / REPORT


def render_eval_report(report: dict, folder: Path) -> str:
    title = (
        f"{report.get('model', '?')} on {report.get('dataset', '?')} ({report.get('split', '?')})"
    )
    images = number(report.get("num_samples"))
    where = f"{fmt(images, '{:,}')} images &middot; " if images is not None else ""
    page = Page(
        f"Evaluation: {title}",
        f"{where}checkpoint <code>{esc(report.get('checkpoint', ''))}</code>",
    )
    page.section(
        "metrics",
        "Metrics",
        metrics_table(report, EVAL_METRICS, skip=("calibration.calibrated.bins",)),
    )
    page.section("classes", "Per class", _per_class(report.get("per_class")))
    page.section(
        "confusion",
        "Confusion matrix",
        _confusion(report.get("confusion_matrix"), report.get("classes"), folder),
    )
    page.section(
        "reliability", "Reliability diagram", png(folder / "reliability.png", "reliability diagram")
    )
    page.section(
        "mistakes",
        "Most confident mistakes",
        png(folder / "misclassified.png", "most confident mistakes"),
    )
    return page.render()


def _per_class(per_class) -> str:
    if not isinstance(per_class, list) or not per_class:
        return ""
    rows = [r for r in per_class if isinstance(r, dict)]
    keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k != "name"]
    columns = [Column("name", "class")] + [
        Column(k, k, PER_CLASS_FORMATS.get(k, "{:.4f}")) for k in keys
    ]
    return table(columns, rows)


def read_metrics_csv(path: Path) -> list[dict]:
    """The rows of a metrics.csv, each value a number or None; [] when it is missing or not a
    regular file. A row without a numeric epoch is skipped."""
    path = Path(path)
    try:
        if irregular(path) or not path.is_file():
            return []
        with open(path, newline="", encoding="utf-8", errors="replace") as f:
            rows = [
                {k: number(v) for k, v in row.items() if k is not None} for row in csv.DictReader(f)
            ]
    except (OSError, csv.Error):
        return []
    return [r for r in rows if r.get("epoch") is not None]


def write_sweep_report(sweep_dir: Path, rows: list[dict]) -> Path:
    """report.html of a sweep: `rows` are callbacks.summarize_sweep's (one per job)."""
    sweep_dir = Path(sweep_dir)
    write_text(sweep_dir / REPORT, render_sweep_report(sweep_dir, rows))
    return sweep_dir / REPORT


def render_sweep_report(sweep_dir: Path, rows: list[dict]) -> str:
    jobs = [_sweep_row(sweep_dir, r) for r in rows]
    failed = sum(r.get("status") == "failed" for r in rows)
    page = Page(
        f"Sweep {'/'.join(sweep_dir.parts[-2:])}",
        f"{esc(sweep_dir)} &middot; {len(rows)} jobs" + (f", {failed} failed" if failed else ""),
    )
    columns = [c for c in SWEEP_COLUMNS if any(j.get(c.key) not in (None, "") for j in jobs)]
    page.section(
        "jobs",
        "Jobs",
        table(
            columns,
            jobs,
            classes=lambda row, key: (
                f"status-{row['status']}"
                if key == "status" and row.get("status") in ("failed", "chance")
                else None
            ),
        ),
    )
    page.section("curves", "Val accuracy per epoch", _sweep_curves(page, sweep_dir, rows))
    return page.render()


def _sweep_row(sweep_dir: Path, row: dict) -> dict:
    """A summary row for the table: the job linked to its report.html (relative, so the sweep
    folder can be moved or copied whole), metrics from its results.json that the summary
    lacks, its error or note in one column."""
    job_dir = _job_dir(sweep_dir, row)
    results = read_json(job_dir / "results.json") or {}
    out = {c.key: row.get(c.key, results.get(c.key)) for c in SWEEP_COLUMNS}
    out["problem"] = row.get("error") or row.get("note") or ""
    if (job_dir / REPORT).is_file():
        href = Path(os.path.relpath(job_dir / REPORT, sweep_dir)).as_posix()
        out["job"] = Link(str(row.get("job", job_dir.name)), _url(href))
    return out


def _url(relative: str) -> str:
    from urllib.parse import quote

    return quote(relative, safe="/._-+~")


def _job_dir(sweep_dir: Path, row: dict) -> Path:
    """A job's folder: by its name under the sweep folder (its results.json's run_dir is where
    it ran, stale once the sweep folder is moved or copied)."""
    return sweep_dir / str(row.get("job", ""))


def _sweep_curves(page: Page, sweep_dir: Path, rows: list[dict]) -> str:
    runs = []
    for r in rows:
        history = read_metrics_csv(_job_dir(sweep_dir, r) / "metrics.csv")
        label = f"{r.get('job')}: {r.get('swept')}" if r.get("swept") else str(r.get("job"))
        runs.append((label[:80], {h["epoch"]: h.get("val_acc") for h in history}))
    epochs = sorted({e for _, values in runs for e in values})
    series = [{"label": label, "values": [values.get(e) for e in epochs]} for label, values in runs]
    chart = page.chart("val accuracy", epochs, series, "epoch", "val accuracy", wide=True)
    return chart or '<p class="note">No job has a val accuracy per epoch (metrics.csv) yet.</p>'
