"""Per-epoch records of a run: the log line, metrics.csv, TensorBoard scalars, curves.png and
report.html (html_report.RunReport)."""

from __future__ import annotations

import csv
import logging
import time
from pathlib import Path

from cnntrain.files import atomic_write, save_figure
from cnntrain.text import plot_text

log = logging.getLogger("cnntrain")

COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "time", "img_per_s")


def format_row(row: dict, epochs: int) -> str:
    parts = [f"epoch {row['epoch']}/{epochs}"]
    for key in COLUMNS[1:]:
        value = row.get(key)
        if value is None:
            continue
        parts.append(
            f"{key} {value:.4g}"
            if key == "lr"
            else f"{key} {value:.1f}s"
            if key == "time"
            else f"{key} {value:.0f}"
            if key == "img_per_s"
            else f"{key} {value:.4f}"
        )
    return " ".join(parts)


def at_chance(val_acc, train_acc, num_classes: int | None) -> bool:
    """Whether validation accuracy sits at chance (1/K for K classes) while training accuracy
    has clearly risen: val_acc <= 1.5/K and train_acc >= 2.5/K. A network that learned anything
    validates well above 1.5/K after an epoch, and 2.5/K means the training batches are being
    learned, so the gap points at eval mode or the data, not at slow learning. The usual cause:
    BatchNorm running statistics that have not settled (few steps, a small momentum), or val data
    that differ from train. Never true for two classes (train_acc would need to exceed 1)."""
    if val_acc is None or train_acc is None or not num_classes:
        return False
    return val_acc <= 1.5 / num_classes and train_acc >= 2.5 / num_classes


def chance_warning(row: dict, num_classes: int) -> str:
    return (
        f"val accuracy {row['val_acc']:.3f} is at chance (1/{num_classes}) while train "
        f"accuracy is {row['train_acc']:.3f}: BatchNorm running statistics may not have "
        "settled (few steps) or the val data differ from train"
    )


class RunTracker:
    """`history` is every epoch's row so far (restored on resume), so the CSV and the plot are
    always rewritten whole and a resumed run's files match an uninterrupted one's.
    With write=False (ranks > 0 under torchrun) it only keeps the history. curves.png is headed
    by `title` (e.g. "resnet20 on cifar10") and the run folder (its last two parts, the date and
    time of outputs/<date>/<time>, since the time alone says little). Given `num_classes`, the
    first epoch whose val accuracy is at chance (`at_chance`) logs a warning. `report`
    (html_report.RunReport) rewrites report.html with every epoch, and with the test result in
    `log_final`."""

    def __init__(
        self,
        run_dir: Path,
        epochs: int,
        history: list[dict] | None = None,
        write: bool = True,
        title: str | None = None,
        num_classes: int | None = None,
        report=None,
    ):
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir, self.epochs, self.write = Path(run_dir), epochs, write
        self.num_classes, self.warned, self.report = num_classes, False, report
        self.history = list(history or [])
        folder = "/".join(self.run_dir.parts[-2:])
        self.title = f"{title} ({folder})" if title else folder
        self.tb = SummaryWriter(str(self.run_dir / "tb")) if write else None
        if self.history and write:  # resumed into a new folder: carry the earlier epochs over
            self._write_csv()
            self._plot()
            self._write_report()

    def log_epoch(self, row: dict) -> None:
        self.history.append(row)
        if not self.write:
            return
        log.info(format_row(row, self.epochs))
        if not self.warned and self.at_chance(row["epoch"]):
            self.warned = True
            log.warning(chance_warning(row, self.num_classes))
        self._write_csv()
        for key in COLUMNS[1:]:
            if row.get(key) is not None:
                split, _, name = key.partition(
                    "_"
                )  # train_loss -> loss/train: one chart per metric
                tag = f"{name}/{split}" if split in ("train", "val") else key
                self.tb.add_scalar(tag, row[key], row["epoch"])
        self.tb.flush()
        self._plot()
        self._write_report()

    def at_chance(self, epoch: int | None) -> bool:
        """Whether that epoch's val accuracy was at chance (`at_chance`)."""
        row = next((r for r in self.history if r["epoch"] == epoch), None)
        return row is not None and at_chance(
            row.get("val_acc"), row.get("train_acc"), self.num_classes
        )

    def _write_csv(self) -> None:
        with atomic_write(self.run_dir / "metrics.csv", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.history)

    def stopped(self, why: BaseException) -> None:
        """report.html of a run that stops before its end (a signal, an error): says why,
        instead of "running". A failure to write it (the disk that stopped the run is full)
        must not hide the error being raised, so it is only logged."""
        if self.report is None:
            return
        try:
            self.report.write(self.history, stopped=str(why) or type(why).__name__)
        except Exception as e:
            log.debug("report.html not updated: %s", e)

    def _write_report(self, *final) -> None:
        if self.report is not None:
            self.report.write(self.history, *final)

    def _plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator

        from cnntrain.report import margins

        epochs = [r["epoch"] for r in self.history]
        fig, axes = plt.subplots(1, 3, figsize=(14, 4.3))
        margins(fig, left=0.75, right=0.2, top=0.55, bottom=0.55, wspace=0.85, cols=3)
        fig.suptitle(plot_text(self.title))
        for ax, metric in zip(axes, ("loss", "acc")):
            for split in ("train", "val"):
                values = [r.get(f"{split}_{metric}") for r in self.history]
                if any(v is not None for v in values):
                    ax.plot(epochs, values, marker="o", label=split)
            ax.set_ylabel("accuracy" if metric == "acc" else "loss")
            ax.legend()
        axes[2].plot(epochs, [r["lr"] for r in self.history], marker="o", color="tab:green")
        axes[2].set_ylabel("learning rate (start of epoch)")
        for ax in axes:
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no epoch 1.5
            ax.grid(alpha=0.3)
        try:
            save_figure(fig, self.run_dir / "curves.png", dpi=100)
        finally:
            plt.close(fig)

    def log_predictions(
        self, loader, result: dict, classes: list[str], epoch: int, count: int = 8
    ) -> None:
        """TensorBoard: the first validation images with their predicted and true labels."""
        if not self.write:
            return
        from cnntrain.report import prediction_captions, samples_figure

        indices = list(range(min(count, len(result["predicted"]))))
        fig = samples_figure(
            loader,
            indices,
            prediction_captions(result, classes, indices),
            f"validation, epoch {epoch}",
        )
        self.tb.add_figure("val/predictions", fig, epoch)  # closes the figure

    def log_final(self, hparams: dict, results: dict, confusion=None, classes=None) -> None:
        """TensorBoard: the test confusion matrix and the run's hyper-parameters with its final
        metrics (the HParams tab then compares the runs of a sweep)."""
        if not self.write:
            return
        if confusion is not None:
            from cnntrain.report import confusion_figure

            self.tb.add_figure(
                "test/confusion_matrix", confusion_figure(confusion, classes, "test")
            )
        metrics = {
            f"hparam/{k}": results[k]
            for k in ("test_acc", "best_val_acc")
            if results.get(k) is not None
        }
        for summary in hparams_summaries(hparams, trial=str(self.run_dir)):
            self.tb.file_writer.add_summary(summary)
        for tag, value in metrics.items():
            self.tb.add_scalar(tag, value)
        self.tb.flush()
        self._write_report(results, confusion, classes)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def hparams_summaries(hparams: dict, trial: str) -> list:
    """The HParams plugin's session start (each value with its type: bool, number or string) and
    end records of one run. Not SummaryWriter.add_hparams: it logs bools as numbers, and it writes
    an experiment record per run, from which TensorBoard takes the columns of one run, all marked
    as not differing; so its dashboard, which ticks 5 columns, differing ones first, ticked the
    first 5 by name. Without that record TensorBoard derives the columns from all runs and
    ticks those whose values differ (a sweep's model, lr) first."""
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2, summary_v2

    start = summary_v2.hparams_pb(hparams, trial_id=trial)
    end = plugin_data_pb2.HParamsPluginData(
        session_end_info=plugin_data_pb2.SessionEndInfo(
            status=api_pb2.STATUS_SUCCESS, end_time_secs=time.time()
        )
    )
    end = Summary(
        value=[
            Summary.Value(
                tag=metadata.SESSION_END_INFO_TAG, metadata=metadata.create_summary_metadata(end)
            )
        ]
    )
    return [start, end]
