"""Hydra callbacks. SweepSummary: at the end of a multirun, one table of all jobs (summary.csv,
summary.md, and report.html with every job's curve and a link to its own report)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from cnntrain.files import atomic_write, write_text
from cnntrain.html_report import write_sweep_report
from cnntrain.text import markdown_table, md_cell

# The failed jobs of the sweep that just ended, found by their folders: the exit code of the
# sweep, whichever launcher ran the jobs (joblib and submitit run them in other processes).
FAILED_JOBS: list[str] = []

COLUMNS = (
    "job",
    "overrides",
    "status",
    "test_acc",
    "best_val_acc",
    "best_epoch",
    "epochs",
    "params",
    "train_time_s",
    "run_dir",
    "error",
    "note",
)


def _job_row(job_dir: Path) -> dict:
    # plain YAML, not a config: an override's `${...}` is shown as typed, never resolved
    overrides = yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text()) or []
    row = {"job": job_dir.name, "overrides": " ".join(overrides), "run_dir": str(job_dir)}
    results = job_dir / "results.json"
    if results.is_file():
        data = json.loads(results.read_text())
        row.update({k: data.get(k) for k in COLUMNS if k in data}, status="ok")
        if data.get("val_at_chance"):  # trained, but its best checkpoint validates at chance
            row.update(
                status="chance",
                note="val accuracy at chance while train accuracy rose: "
                "BatchNorm statistics not settled (few steps?) or val data unlike train",
            )
        return row
    errors = [
        line.split("error: ", 1)[1]
        for log in job_dir.glob("*.log")
        for line in log.read_text(errors="replace").splitlines()
        if "error: " in line
    ]
    row.update(status="failed", error=errors[-1] if errors else "no results.json (interrupted?)")
    return row


def summarize_sweep(sweep_dir: Path) -> list[dict]:
    """Rows of every job folder under sweep_dir, best test accuracy first, then the jobs whose
    val accuracy is at chance (status `chance`, see tracking.at_chance), failed jobs last."""
    jobs = [d for d in Path(sweep_dir).iterdir() if (d / ".hydra" / "overrides.yaml").is_file()]
    rows = [_job_row(d) for d in jobs]
    common = set.intersection(*(set(r["overrides"].split()) for r in rows)) if rows else set()
    for r in rows:  # what this job changed, without the overrides every job shares
        r["swept"] = " ".join(o for o in r["overrides"].split() if o not in common)
    order = {"ok": 0, "chance": 1}  # then failed
    rows.sort(
        key=lambda r: (order.get(r["status"], 2), -(r.get("test_acc") or 0), _job_number(r["job"]))
    )
    return rows


def _job_number(folder: str) -> int:
    """The job number of a job folder (<n>_<model>_<data>, or <n> before the names)."""
    number = folder.split("_", 1)[0]
    return int(number) if number.isdigit() else 0


def _cell(value, column: str) -> str:
    if isinstance(value, float):
        return f"{value:.1f}" if column == "train_time_s" else f"{value:.4f}"
    return "" if value is None else str(value)


def format_table(rows: list[dict]) -> str:
    cols = (
        "job",
        "swept",
        "status",
        "test_acc",
        "best_val_acc",
        "epochs",
        "params",
        "train_time_s",
        "run_dir",
        "error",
        "note",
    )
    return markdown_table(cols, [[_cell(r.get(c), c) for c in cols] for r in rows], pad=False)


def write_summary(sweep_dir: Path, rows: list[dict]) -> None:
    with atomic_write(Path(sweep_dir) / "summary.csv", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    write_text(
        Path(sweep_dir) / "summary.md", f"# Sweep {md_cell(sweep_dir)}\n\n{format_table(rows)}\n"
    )


class SweepSummary(Callback):
    """Writes summary.csv, summary.md and report.html into the sweep folder and prints the
    table."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        rows = summarize_sweep(sweep_dir)
        if not rows:
            return
        FAILED_JOBS[:] = [
            f"job {r['job']}: error: {r['error']}" for r in rows if r["status"] == "failed"
        ]
        write_summary(sweep_dir, rows)
        write_sweep_report(sweep_dir, rows)
        print(f"\nsweep summary ({sweep_dir / 'summary.md'}):\n{format_table(rows)}", flush=True)
