"""The cnneval report: per-class metrics from the confusion matrix, a console table,
report.json and report.md."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from cnntrain.calibration import report_lines
from cnntrain.files import atomic_write, save_figure, write_text
from cnntrain.text import markdown_table, md_cell, md_code, plot_text, visible


def per_class_metrics(confusion: torch.Tensor, classes: list[str]) -> list[dict]:
    """confusion: (K, K), rows = true class, columns = predicted."""
    c = confusion.double()
    tp = c.diag()
    support, predicted = c.sum(1), c.sum(0)
    recall = torch.where(support > 0, tp / support.clamp_min(1), torch.zeros_like(tp))
    precision = torch.where(predicted > 0, tp / predicted.clamp_min(1), torch.zeros_like(tp))
    denom = precision + recall
    f1 = torch.where(
        denom > 0, 2 * precision * recall / denom.clamp_min(1e-12), torch.zeros_like(tp)
    )
    # a class's accuracy is the fraction of its images classified correctly (= recall)
    return [
        {
            "name": name,
            "support": int(support[i]),
            "accuracy": float(recall[i]),
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
        }
        for i, name in enumerate(classes)
    ]


def class_averages(confusion: torch.Tensor) -> dict:
    """The scores that weigh every class alike, as scikit-learn computes them from the same
    predictions: "macro_f1", the mean F1 over the classes that occur among the true or the
    predicted labels (f1_score(average="macro")), and "balanced_acc", the mean recall over the
    classes that occur among the true labels (balanced_accuracy_score)."""
    c = confusion.double()
    tp, support, predicted = c.diag(), c.sum(1), c.sum(0)
    # F1 = 2 TP / (true + predicted images of the class): 0 for a class predicted but absent
    seen = (support + predicted) > 0
    f1 = 2 * tp[seen] / (support + predicted)[seen]
    present = support > 0
    recall = tp[present] / support[present]
    return {
        "macro_f1": f1.mean().item() if len(f1) else 0.0,
        "balanced_acc": recall.mean().item() if len(recall) else 0.0,
    }


def build_report(result: dict, *, classes, split, dataset, model, checkpoint) -> dict:
    return {
        "top1": result["acc"],
        **class_averages(result["confusion"]),
        "top5": result["top5"],
        "loss": result["loss"],
        "num_samples": result["num_samples"],
        "split": split,
        "dataset": dataset,
        "model": model,
        "checkpoint": str(checkpoint),
        "classes": list(classes),
        "per_class": per_class_metrics(result["confusion"], classes),
        "confusion_matrix": result["confusion"].tolist(),
    }


def _table(report: dict) -> str:
    rows = [
        [
            r["name"],
            r["support"],
            *(f"{r[k]:.4f}" for k in ("accuracy", "precision", "recall", "f1")),
        ]
        for r in report["per_class"]
    ]
    return markdown_table(
        ["class", "support", "accuracy", "precision", "recall", "f1"], rows, align="lrrrrr"
    )


def _summary(report: dict) -> str:
    top5 = "n/a (< 5 classes)" if report["top5"] is None else f"{report['top5']:.4f}"
    # reports written before macro-F1 and balanced accuracy have neither
    averages = "".join(
        f"  {name} {report[key]:.4f}"
        for key, name in (("macro_f1", "macro-F1"), ("balanced_acc", "balanced acc"))
        if report.get(key) is not None
    )
    return (
        f"top1 {report['top1']:.4f}{averages}  top5 {top5}  loss {report['loss']:.4f}  "
        f"({report['num_samples']} {report['split']} images)"
    )


def format_report(report: dict) -> str:
    head = (
        f"{report['model']} on {report['dataset']} ({report['split']}) from {report['checkpoint']}"
    )
    return "\n".join([visible(head), _summary(report), *report_lines(report), _table(report)])


def write_report(report: dict, folder: Path) -> None:
    folder = Path(folder)
    write_text(folder / "report.json", json.dumps(report, indent=2) + "\n")
    classes = report["classes"]
    confusion = markdown_table(
        ["true \\ predicted", *classes],
        [[name, *row] for name, row in zip(classes, report["confusion_matrix"])],
        align="l" + "r" * len(classes),
        pad=False,
    )
    md = [
        f"# Evaluation: {md_cell(report['model'])} on {md_cell(report['dataset'])} ({md_cell(report['split'])})",
        "",
        f"Checkpoint: {md_code(report['checkpoint'])}",
        "",
        _summary(report),
        "",
        *(line + "\n" for line in report_lines(report)),
        _table(report),
        "",
        "## Confusion matrix (rows = true, columns = predicted)",
        "",
        confusion,
    ]
    write_text(folder / "report.md", "\n".join(md) + "\n")


def write_predictions(result: dict, loader, classes, folder: Path) -> None:
    """predictions.csv: sample (file path, or index in the split), true, predicted, confidence."""
    import csv

    with atomic_write(Path(folder) / "predictions.csv", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sample", "true", "predicted", "confidence"])
        for i, (t, p, c) in enumerate(
            zip(
                result["target"].tolist(),
                result["predicted"].tolist(),
                result["confidence"].tolist(),
            )
        ):
            writer.writerow([loader.sample_name(i), classes[t], classes[p], f"{c:.4f}"])


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def margins(fig, *, left, right, top, bottom, hspace=0.0, wspace=0.0, rows=1, cols=1):
    """Place a grid of axes by margins and gaps given in inches. The figures drawn every epoch
    (curves.png, TensorBoard's validation predictions) are fixed grids: a layout engine
    ("constrained" or tight_layout) measured every text on each draw and took 60-70 % of
    their time, 0.4-1 s an epoch."""
    width, height = fig.get_size_inches()
    axes_w = (width - left - right - (cols - 1) * wspace) / cols
    axes_h = (height - top - bottom - (rows - 1) * hspace) / rows
    fig.subplots_adjust(
        left=left / width,
        right=1 - right / width,
        top=1 - top / height,
        bottom=bottom / height,
        wspace=wspace / axes_w,
        hspace=hspace / axes_h,
    )


def confusion_figure(confusion: torch.Tensor, classes: list[str], title: str):
    """Row-normalized confusion matrix (rows = true class), class names on the axes."""
    plt = _pyplot()
    k = len(classes)
    normalized = confusion.double() / confusion.double().sum(1, keepdim=True).clamp_min(1)
    size = min(4 + 0.45 * k, 20)
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(normalized.numpy(), cmap="Blues", vmin=0, vmax=1)
    labels = (
        [plot_text(c) for c in classes] if k <= 40 else []
    )  # beyond that the names are unreadable anyway
    ax.set_xticks(range(len(labels)), labels, rotation=90)
    ax.set_yticks(range(len(labels)), labels)
    if k <= 20:
        for i in range(k):
            for j in range(k):
                v = normalized[i, j].item()
                ax.text(
                    j,
                    i,
                    f"{v:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if v > 0.5 else "black",
                )
    ax.set(xlabel="predicted", ylabel="true", title=plot_text(title))
    fig.colorbar(im, fraction=0.046)
    fig.tight_layout()
    return fig


def samples_figure(loader, indices: list[int], titles: list[str], title: str, cols: int = 4):
    """A grid of the loader's samples (original pixels) with a caption each."""
    plt = _pyplot()
    rows = max(1, -(-len(indices) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.75 * rows + 0.4), squeeze=False)
    # room for each two-line caption above its image (with tight_layout the second row's
    # captions ran into the first row's images)
    margins(
        fig,
        left=0.05,
        right=0.05,
        top=0.85,
        bottom=0.05,
        hspace=0.45,
        wspace=0.1,
        rows=rows,
        cols=cols,
    )
    for ax in axes.flat:
        ax.axis("off")
    for ax, i, caption in zip(axes.flat, indices, titles):
        image = loader.sample(i)
        ax.imshow(image.squeeze(-1) if image.shape[-1] == 1 else image, cmap="gray")
        ax.set_title(caption, fontsize=8)
    if not indices:
        axes.flat[0].text(0.5, 0.5, "nothing to show", ha="center", va="center")
    fig.suptitle(plot_text(title))
    return fig


def prediction_captions(result: dict, classes: list[str], indices: list[int]) -> list[str]:
    return [
        f"true: {plot_text(classes[result['target'][i]])}\npred: {plot_text(classes[result['predicted'][i]])} "
        f"({result['confidence'][i]:.2f})"
        for i in indices
    ]


def per_class_figure(report: dict):
    """Accuracy per class as bars, each with its value."""
    plt = _pyplot()
    classes = report["classes"]
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(classes)), 4), layout="constrained")
    bars = ax.bar(range(len(classes)), [c["accuracy"] for c in report["per_class"]])
    # beyond 20 bars horizontal values would run into each other
    ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=2, rotation=0 if len(classes) <= 20 else 90)
    labels = (
        [plot_text(c) for c in classes] if len(classes) <= 40 else []
    )  # beyond that unreadable anyway
    ax.set_xticks(range(len(labels)), labels, rotation=90)
    ax.set(
        ylim=(0, 1.15),
        yticks=[0, 0.2, 0.4, 0.6, 0.8, 1],
        ylabel="accuracy",  # room for labels over 1.0
        title=plot_text(
            f"Accuracy per class: {report['model']} on {report['dataset']} "
            f"({report['split']}), top-1 {report['top1']:.4f}"
        ),
    )
    return fig


def write_figures(report: dict, result: dict, loader, folder: Path, max_mistakes: int = 16) -> None:
    """confusion_matrix.png, per_class.png and misclassified.png (the most confident mistakes,
    with true and predicted labels)."""
    plt = _pyplot()
    folder, classes = Path(folder), report["classes"]
    title = (
        f"{report['model']} on {report['dataset']} ({report['split']}): top-1 {report['top1']:.4f}"
    )
    figures = {"confusion_matrix.png": confusion_figure(result["confusion"], classes, title)}

    figures["per_class.png"] = per_class_figure(report)

    wrong = (result["predicted"] != result["target"]).nonzero().flatten()
    wrong = wrong[result["confidence"][wrong].argsort(descending=True)][:max_mistakes].tolist()
    figures["misclassified.png"] = samples_figure(
        loader, wrong, prediction_captions(result, classes, wrong), "most confident mistakes"
    )
    for name, fig in figures.items():
        save_figure(fig, folder / name, dpi=100)
        plt.close(fig)


def write_comparison(reports: list[dict], folder: Path) -> str:
    """comparison.csv / comparison.md: one row per evaluated checkpoint, best top-1 first.
    Returns the markdown table."""
    import csv

    cols = (
        "model",
        "dataset",
        "split",
        "top1",
        "macro_f1",
        "balanced_acc",
        "top5",
        "loss",
        "ece",
        "num_samples",
        "checkpoint",
    )
    rows = [{**r, "ece": r.get("calibration", {}).get("ece")} for r in reports]
    rows = sorted(rows, key=lambda r: -r["top1"])
    with atomic_write(Path(folder) / "comparison.csv", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)

    def cell(v):
        return f"{v:.4f}" if isinstance(v, float) else "" if v is None else str(v)

    table = markdown_table(cols, [[cell(r[c]) for c in cols] for r in rows], pad=False)
    write_text(Path(folder) / "comparison.md", f"# Checkpoint comparison\n\n{table}\n")
    return table
