"""How far a model's confidences are from its accuracy: expected calibration error (ECE), negative
log-likelihood (NLL) and the multi-class Brier score, with the reliability table and diagram they
come from (Guo et al. 2017, "On Calibration of Modern Neural Networks").

Everything is computed from per-sample numbers: the top-1 confidence, whether top-1 is right, the
cross-entropy of the true class and the Brier term sum_k (p_k - y_k)^2. evaluate_loader keeps just
these (sample_terms), so a 1000-class evaluation holds a few numbers per image, not its logits."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from cnntrain.files import save_figure
from cnntrain.text import markdown_table, md_code, plot_text

BINS = 15  # Guo et al.'s equal-width confidence bins; the common choice, so numbers compare


def brier_terms(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per sample: sum over the K classes of (p_k - [k == y])^2, p = softmax(logits); 0 for a
    certain right answer, 2 for a certain wrong one. The Brier score is their mean."""
    p = logits.float().softmax(1)
    # sum_k p_k^2 - 2 p_y + 1: (p - onehot)^2 summed, without building the one-hot matrix
    return p.square().sum(1) - 2 * p.gather(1, target[:, None])[:, 0] + 1


def sample_terms(logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per sample of (N, K) logits: "confidence" (top-1 probability), "correct" (bool), "nll"
    (cross-entropy of the true class) and "brier" (brier_terms)."""
    logits = logits.float()
    top = logits.softmax(1).max(1)
    return {
        "confidence": top.values,
        "correct": top.indices == target,
        "nll": F.cross_entropy(logits, target, reduction="none"),
        "brier": brier_terms(logits, target),
    }


def terms_of(result: dict) -> dict[str, torch.Tensor]:
    """sample_terms of what evaluate_loader(keep_predictions=True) kept."""
    return {
        "confidence": result["confidence"],
        "correct": result["predicted"] == result["target"],
        "nll": result["nll"],
        "brier": result["brier"],
    }


def reliability(confidence: torch.Tensor, correct: torch.Tensor, bins: int = BINS) -> list[dict]:
    """The reliability table: per equal-width bin (lower, upper] of top-1 confidence, its "count",
    mean "confidence" and "accuracy" (None for an empty bin)."""
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    conf = confidence.double().cpu()
    # bucketize(right=False) puts x in bin i when edges[i] < x <= edges[i+1], as Guo et al. do
    index = torch.bucketize(conf, edges[1:-1])
    count = torch.bincount(index, minlength=bins)
    conf_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, conf)
    hits = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, correct.double().cpu())
    return [
        {
            "lower": float(edges[i]),
            "upper": float(edges[i + 1]),
            "count": int(count[i]),
            "confidence": float(conf_sum[i] / count[i]) if count[i] else None,
            "accuracy": float(hits[i] / count[i]) if count[i] else None,
        }
        for i in range(bins)
    ]


def expected_calibration_error(table: list[dict]) -> float:
    """sum over bins of (bin count / N) * |accuracy - confidence| of a reliability table."""
    n = sum(b["count"] for b in table)
    return sum(b["count"] / n * abs(b["accuracy"] - b["confidence"]) for b in table if b["count"])


def metrics(terms: dict[str, torch.Tensor], temperature: float = 1.0) -> dict:
    """{"ece", "nll", "brier", "temperature", "reliability"} of per-sample terms (sample_terms,
    or evaluate_loader's kept ones), the probabilities being softmax(logits / temperature)."""
    table = reliability(terms["confidence"], terms["correct"])
    return {
        "ece": expected_calibration_error(table),
        "nll": terms["nll"].double().mean().item(),
        "brier": terms["brier"].double().mean().item(),
        "temperature": float(temperature),
        "bins": BINS,
        "reliability": table,
    }


def of_logits(logits: torch.Tensor, target: torch.Tensor, temperature: float = 1.0) -> dict:
    """metrics() of the probabilities softmax(logits / temperature)."""
    return metrics(sample_terms(logits / temperature, target), temperature)


def summary_line(cal: dict) -> str:
    return (
        f"ECE {cal['ece']:.4f} ({cal['bins']} bins)  NLL {cal['nll']:.4f}  "
        f"Brier {cal['brier']:.4f}  at temperature {cal['temperature']:.4g}"
    )


def report_lines(report: dict) -> list[str]:
    """The calibration lines of the console report and report.md: the metrics, and with
    calibrate=true a before/after table and where the temperature was stored."""
    cal = report.get("calibration")
    if not cal:
        return []
    lines = [f"calibration: {summary_line(cal)}"]
    after = cal.get("calibrated")
    if after:
        rows = [
            [name, f"{c['temperature']:.4g}", *(f"{c[k]:.4f}" for k in ("ece", "nll", "brier"))]
            for name, c in (("before", cal), ("after", after))
        ]
        lines += [
            f"temperature scaling (fit on {after['fit_samples']} {after['fit_split']} images, "
            f"judged on {report['split']}): T = {after['temperature']:.4g}, stored in "
            f"{md_code(after['checkpoint'])}",
            markdown_table(["", "T", "ECE", "NLL", "Brier"], rows, align="lrrrr"),
        ]
    return lines


def _panel(ax, cal: dict, title: str) -> None:
    """Reliability bars (accuracy per confidence bin, its count above it) over the diagonal."""
    width = 1 / cal["bins"]
    table = [b for b in cal["reliability"] if b["count"]]
    centers = [(b["lower"] + b["upper"]) / 2 for b in table]
    accuracy = [b["accuracy"] for b in table]
    confidence = [b["confidence"] for b in table]
    ax.bar(centers, accuracy, width, edgecolor="black", linewidth=0.5, label="accuracy")
    for x, a, c, b in zip(centers, accuracy, confidence, table):  # above the bar and its gap
        ax.text(x, max(a, c) + 0.01, str(b["count"]), ha="center", va="bottom", fontsize=6)
    # the gap from each bin's accuracy to its mean confidence, over or under the bar
    ax.bar(
        centers,
        [abs(c - a) for a, c in zip(accuracy, confidence)],
        width,
        bottom=[min(a, c) for a, c in zip(accuracy, confidence)],
        color="tab:red",
        alpha=0.3,
        edgecolor="tab:red",
        hatch="//",
        linewidth=0.5,
        label="gap to mean confidence",
    )
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.set(
        xlim=(0, 1),
        ylim=(0, 1.08),
        xlabel="confidence (top-1 probability)",
        ylabel="accuracy",
        title=plot_text(title),
    )
    ax.legend(loc="upper left", fontsize=7)


def reliability_figure(report: dict):
    """One panel (the report's probabilities), or two (before and after temperature scaling)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cal = report["calibration"]
    panels = [cal] + ([cal["calibrated"]] if cal.get("calibrated") else [])
    fig, axes = plt.subplots(
        1, len(panels), figsize=(5 * len(panels), 5), squeeze=False, layout="constrained"
    )
    for ax, c in zip(axes[0], panels):
        _panel(ax, c, f"T = {c['temperature']:.3g}: ECE {c['ece']:.4f}")
    fig.suptitle(
        plot_text(
            f"Reliability: {report['model']} on {report['dataset']} ({report['split']}, "
            f"{report['num_samples']} images; bar labels: images per bin)"
        ),
        fontsize=9,
    )
    return fig, plt


def write_reliability(report: dict, folder: Path) -> None:
    fig, plt = reliability_figure(report)
    try:
        save_figure(fig, Path(folder) / "reliability.png", dpi=100)
    finally:
        plt.close(fig)
