"""The cnneval report: per-class metrics from the confusion matrix, a console table,
report.json and report.md."""
from __future__ import annotations

import json
from pathlib import Path

import torch


def per_class_metrics(confusion: torch.Tensor, classes: list[str]) -> list[dict]:
    """confusion: (K, K), rows = true class, columns = predicted."""
    c = confusion.double()
    tp = c.diag()
    support, predicted = c.sum(1), c.sum(0)
    recall = torch.where(support > 0, tp / support.clamp_min(1), torch.zeros_like(tp))
    precision = torch.where(predicted > 0, tp / predicted.clamp_min(1), torch.zeros_like(tp))
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp_min(1e-12), torch.zeros_like(tp))
    # a class's accuracy is the fraction of its images classified correctly (= recall)
    return [{"name": name, "support": int(support[i]), "accuracy": float(recall[i]),
             "precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i])}
            for i, name in enumerate(classes)]


def build_report(result: dict, *, classes, split, dataset, model, checkpoint) -> dict:
    return {
        "top1": result["acc"], "top5": result["top5"], "loss": result["loss"],
        "num_samples": result["num_samples"], "split": split, "dataset": dataset, "model": model,
        "checkpoint": str(checkpoint), "classes": list(classes),
        "per_class": per_class_metrics(result["confusion"], classes),
        "confusion_matrix": result["confusion"].tolist(),
    }


def _table(report: dict) -> list[str]:
    width = max(8, *(len(r["name"]) for r in report["per_class"]))
    lines = [f"| {'class':<{width}} | support | accuracy | precision | recall |     f1 |",
             f"|{'-' * (width + 2)}|--------:|---------:|----------:|-------:|-------:|"]
    for r in report["per_class"]:
        lines.append(f"| {r['name']:<{width}} | {r['support']:7d} | {r['accuracy']:8.4f} | "
                     f"{r['precision']:9.4f} | {r['recall']:6.4f} | {r['f1']:6.4f} |")
    return lines


def _summary(report: dict) -> str:
    top5 = "n/a (< 5 classes)" if report["top5"] is None else f"{report['top5']:.4f}"
    return (f"top1 {report['top1']:.4f}  top5 {top5}  loss {report['loss']:.4f}  "
            f"({report['num_samples']} {report['split']} images)")


def format_report(report: dict) -> str:
    head = f"{report['model']} on {report['dataset']} ({report['split']}) from {report['checkpoint']}"
    return "\n".join([head, _summary(report), *_table(report)])


def write_report(report: dict, folder: Path) -> None:
    folder = Path(folder)
    (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    md = [f"# Evaluation: {report['model']} on {report['dataset']} ({report['split']})", "",
          f"Checkpoint: `{report['checkpoint']}`", "", _summary(report), "", *_table(report), "",
          "## Confusion matrix (rows = true, columns = predicted)", "",
          "| true \\ predicted | " + " | ".join(report["classes"]) + " |",
          "|---|" + "---:|" * len(report["classes"])]
    for name, row in zip(report["classes"], report["confusion_matrix"]):
        md.append(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
    (folder / "report.md").write_text("\n".join(md) + "\n")
