"""Imbalanced classes: the class counts of the training split, the cross-entropy's class
weights (`loss.class_weights`) and the run log's note on counts that differ by more than
IMBALANCE times. The class-balanced batches (`data.sampler=balanced`) are the loader's
(data/loaders.py, ClassDraw); the metrics that weigh every class alike (macro-F1, balanced
accuracy) are the reports' (report.py)."""

from __future__ import annotations

import logging

import torch

from cnntrain.errors import UserError
from cnntrain.text import visible

log = logging.getLogger("cnntrain")

# largest / smallest class of the training split beyond which the run log names the counts
IMBALANCE = 3.0
SHOWN = 10  # classes named with their counts; beyond that the smallest and the largest


def class_counts(labels: torch.Tensor, num_classes: int) -> list[int]:
    """Images per class of a split's labels (class indices)."""
    return torch.bincount(labels.cpu(), minlength=num_classes).tolist()


def class_weights(spec, counts: list[int], dataset: str) -> list[float] | None:
    """The cross-entropy's weight per class for `loss.class_weights=spec`: None (unweighted);
    balanced: n_images / (n_classes * images of the class), as scikit-learn's
    compute_class_weight("balanced") gives, over the training split (the images held out for
    validation are not in it), and 0 for a class without training images (its weight multiplies
    nothing); or the list given, one per class."""
    if spec is None:
        return None
    k, n = len(counts), sum(counts)
    if spec == "balanced":
        return [n / (k * c) if c else 0.0 for c in counts]
    weights = [float(w) for w in spec]
    if len(weights) != k:
        raise UserError(
            f"loss.class_weights has {len(weights)} value(s) but data={dataset} has {k} "
            f"classes: give {k} weights, one per class in the order of the dataset's classes "
            "(or loss.class_weights=balanced)"
        )
    return weights


def imbalanced(counts: list[int]) -> bool:
    """The largest class has more than IMBALANCE times the images of the smallest."""
    return bool(counts) and max(counts) > IMBALANCE * min(counts)


def _counts_text(counts: list[int], classes: list[str]) -> str:
    named = [f"{visible(name)} {count}" for name, count in zip(classes, counts)]
    if len(named) <= SHOWN:
        return ", ".join(named)
    order = sorted(range(len(counts)), key=lambda i: counts[i])
    half = SHOWN // 2
    smallest = ", ".join(named[i] for i in order[:half])
    largest = ", ".join(named[i] for i in order[::-1][:half])
    return f"smallest {smallest}; largest {largest}"


def log_balance(
    counts: list[int], classes: list[str], weights: list[float] | None, spec, sampler: str
) -> None:
    """The run log's note on the training split's classes: their counts when they are
    imbalanced, with the keys that balance them unless one is set; the weights in use."""
    if imbalanced(counts):
        lines = [
            f"imbalanced training split: {max(counts)} to {min(counts)} images per class "
            f"({_ratio(counts)}): {_counts_text(counts, classes)}"
        ]
        if spec is None and sampler == "random":
            lines.append(
                "  to weigh every class alike: loss.class_weights=balanced (the loss, by "
                "inverse class frequency) or data.sampler=balanced (the batches, every class "
                "equally often)"
            )
        log.info("%s", "\n".join(lines))
    if weights is not None:
        shown = ", ".join(f"{w:.4g}" for w in weights[: SHOWN * 2])
        more = f", ... ({len(weights)} classes)" if len(weights) > SHOWN * 2 else ""
        log.info("loss.class_weights=%s: cross-entropy weights [%s%s]", _spec(spec), shown, more)
    if spec == "balanced" and sampler == "balanced":
        log.warning(
            "loss.class_weights=balanced with data.sampler=balanced balances twice: the "
            "batches already hold every class alike, so the weights then favour the rare "
            "classes; use one of the two"
        )


def _ratio(counts: list[int]) -> str:
    return f"{max(counts) / min(counts):.1f}x" if min(counts) else "a class has none"


def _spec(spec) -> str:
    return spec if isinstance(spec, str) else "[" + ",".join(f"{float(w):g}" for w in spec) + "]"
