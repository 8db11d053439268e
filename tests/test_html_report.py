"""report.html (cnntrain/html_report.py, htmlpage.py) in-process: written every epoch and at the
end of a run, beside cnneval's report.json and in a sweep folder; the numbers of the files it
shows; metrics that only newer runs have; odd names as text; nothing loaded from anywhere.
The same pages in a real browser: tests/test_html_browser.py."""

import base64
import csv
import hashlib
import json
import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from test_foreign_files import ODD, odd_report

from cnntrain import html_report
from cnntrain.html_report import RunReport, write_eval_report, write_sweep_report
from cnntrain.htmlpage import esc
from cnntrain.text import visible


class Parsed(HTMLParser):
    """Every tag with its attributes, the text of every table cell (rows of cells), and the
    scripts' contents."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags, self.rows, self.scripts, self._cell, self._script = [], [], [], None, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = ""
        elif tag == "script":
            self._script = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append(self._cell)
            self._cell = None
        elif tag == "script":
            self.scripts.append(self._script)
            self._script = None

    def handle_data(self, data):
        if self._script is not None:
            self._script += data
        elif self._cell is not None:
            self._cell += data


def page_data(text: str) -> dict:
    block = re.search(
        r'<script type="application/json" id="report-data">(.*?)</script>', text, re.S
    )
    return json.loads(block.group(1))


def assert_self_contained(text: str) -> None:
    """Nothing to load: every src is a data: URL, every link an anchor or a relative path; the
    Content-Security-Policy allows no loads and exactly the page's own scripts (their hashes)."""
    parsed = Parsed(text)
    for tag, attrs in parsed.tags:
        assert not attrs.get("src") or attrs["src"].startswith("data:image/png;base64,"), tag
        href = attrs.get("href")
        assert not href or href.startswith("#") or not re.match(r"[a-z]+:|//", href), href
        assert not any(name.startswith("on") for name in attrs), (tag, attrs)
    csp = next(
        a["content"] for t, a in parsed.tags if a.get("http-equiv") == "Content-Security-Policy"
    )
    assert "default-src 'none'" in csp and "img-src data:" in csp
    code = [
        s
        for (t, a), s in zip([x for x in parsed.tags if x[0] == "script"], parsed.scripts)
        if not a.get("type")
    ]
    hashes = {base64.b64encode(hashlib.sha256(s.encode()).digest()).decode() for s in code}
    assert len(code) == 2 and set(re.findall(r"'sha256-([^']+)'", csp)) == hashes


def make_cfg(data_root, *overrides):
    with initialize_config_module(config_module="cnntrain.configs", version_base="1.3"):
        return compose(
            config_name="train",
            overrides=[
                "data=mnist",
                f"data.root={data_root}",
                "data.download=false",
                "device=cpu",
                "epochs=2",
                "max_steps_per_epoch=2",
                *overrides,
            ],
        )


@pytest.fixture(scope="module")
def trained(data_root, tmp_path_factory):
    """A 2-epoch run, the pages its RunReport rendered (one per write) and cnneval's folder."""
    from cnntrain.evaluate import evaluate
    from cnntrain.train import train

    rendered, real = [], RunReport.render

    def render(self, *args, **kwargs):
        rendered.append(real(self, *args, **kwargs))
        return rendered[-1]

    run_dir = tmp_path_factory.mktemp("run")
    mp = pytest.MonkeyPatch()
    mp.setattr(RunReport, "render", render)
    try:
        results = train(make_cfg(data_root), run_dir=run_dir)
    finally:
        mp.undo()
    eval_dir = tmp_path_factory.mktemp("eval")
    with initialize_config_module(config_module="cnntrain.configs", version_base="1.3"):
        ecfg = compose(
            config_name="eval", overrides=[f"ckpt={run_dir}/checkpoints/best.pt", "device=cpu"]
        )
    evaluate(ecfg, run_dir=eval_dir)
    return run_dir, results, rendered, eval_dir


def test_a_run_rewrites_its_report_every_epoch_and_at_the_end(trained):
    run_dir, results, rendered, _ = trained
    assert len(rendered) == 3  # epoch 1, epoch 2, the end with the test result
    first, final = rendered[0], (run_dir / "report.html").read_text()
    assert final == rendered[-1]
    assert "running: epoch 1 of 2 done" in first and 'http-equiv="refresh"' in first
    assert "finished: 2 of 2 epochs" in final and 'http-equiv="refresh"' not in final
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    cells = Parsed(final).rows
    epochs = [r for r in cells if r and r[0] in ("1", "2") and len(r) == 8]
    assert [r[0] for r in epochs] == ["1", "2"]
    for row, shown in zip(rows, epochs):
        assert (
            shown[4] == f"{float(row['val_acc']):.4f}"
            and shown[1] == f"{float(row['train_loss']):.4f}"
        )
    assert ["test accuracy (best.pt)", f"{results['test_acc']:.4f}"] in cells
    assert ["parameters", f"{results['params']:,}"] in cells
    assert ["best epoch", str(results["best_epoch"])] in cells
    assert ["test ECE (15 bins)", f"{results['test_ece']:.4f}"] in cells  # no raw key
    assert any(r[:3] == ["features.0", "Conv2d", "6x28x28"] for r in cells)  # the model summary
    assert "optim:\n  name: sgd" in final and "mean: [" in final  # the resolved config
    charts = page_data(final)["charts"]
    assert [c["title"] for c in charts] == ["loss", "accuracy", "learning rate (start of epoch)"]
    assert charts[1]["series"][1]["values"] == [float(r["val_acc"]) for r in rows]
    matrix = [r for r in cells if len(r) == 11 and r[0] != "true \\ predicted"]
    assert sum(int(c) for r in matrix for c in r[1:]) == results["test_images"]
    assert_self_contained(final)


def test_a_stopped_run_says_so_instead_of_running(data_root, tmp_path, signal_at_batch):
    import signal

    from cnntrain.errors import Interrupted
    from cnntrain.train import train

    signal_at_batch(3)  # the first batch of epoch 2
    with pytest.raises(Interrupted) as stopped:
        train(make_cfg(data_root), run_dir=tmp_path)
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    text = (tmp_path / "report.html").read_text()
    assert "stopped after epoch 1 of 2" in text and "running:" not in text
    assert 'http-equiv="refresh"' not in text  # a stopped run's page stops reloading
    assert esc(str(stopped.value)) in text and "stopped by SIGUSR1 in epoch 2/2" in text


def test_cnneval_writes_its_report_beside_report_json(trained):
    _, _, _, eval_dir = trained
    report = json.loads((eval_dir / "report.json").read_text())
    text = (eval_dir / "report.html").read_text()
    cells = Parsed(text).rows
    assert ["top-1 accuracy", f"{report['top1']:.4f}"] in cells
    per_class = [r for r in cells if len(r) == 6 and r[0] in report["classes"]]
    assert [r[0] for r in per_class] == report["classes"]
    assert [r[5] for r in per_class] == [f"{c['f1']:.4f}" for c in report["per_class"]]
    for figure in ("misclassified.png", "reliability.png"):  # cnneval's figures, inline
        assert base64.b64encode((eval_dir / figure).read_bytes()).decode() in text
    ece = ["ECE (expected calibration error, 15 bins)", f"{report['calibration']['ece']:.4f}"]
    assert ece in cells
    assert_self_contained(text)


def test_metrics_that_land_later_show_without_a_change_here(trained, tmp_path):
    """Calibration (report.json's "calibration", reliability.png) and the imbalance metrics
    (macro_f1, balanced_acc): a labelled row each; a number no row names yet shows under its
    own dotted key."""
    _, _, _, eval_dir = trained
    folder = tmp_path / "eval"
    shutil.copytree(eval_dir, folder)
    report = json.loads((folder / "report.json").read_text())
    report.update(macro_f1=0.61, balanced_acc=0.625, future={"score": 0.5})
    report["calibration"]["calibrated"] = {  # as cnneval calibrate=true writes it
        "temperature": 1.7,
        "ece": 0.0123,
        "nll": 0.25,
        "brier": 0.15,
        "bins": 15,
        "fit_split": "val",
        "fit_samples": 6000,
        "val_nll_before": 0.29,
        "val_nll_after": 0.28,
    }
    (folder / "report.json").write_text(json.dumps(report))
    write_eval_report(folder)
    text = (folder / "report.html").read_text()
    cells = Parsed(text).rows
    cal = report["calibration"]
    for row in (
        ["ECE (expected calibration error, 15 bins)", f"{cal['ece']:.4f}"],
        ["NLL (negative log-likelihood)", f"{cal['nll']:.4f}"],
        ["Brier score", f"{cal['brier']:.4f}"],
        ["fitted temperature (calibrate=true)", "1.7"],
        ["ECE after temperature scaling", "0.0123"],
        ["macro-F1", "0.6100"],
        ["balanced accuracy", "0.6250"],
        ["future.score", "0.5"],
    ):
        assert row in cells, row
    assert ["images the temperature was fit on", "6,000"] in cells
    assert ["Brier score after temperature scaling", "0.1500"] in cells
    # every number cnneval writes has its label: the only dotted key is the one no row names
    assert [r[0] for r in cells if len(r) == 2 and "." in r[0]] == ["future.score"]
    assert 'id="reliability"' in text
    assert base64.b64encode((folder / "reliability.png").read_bytes()).decode() in text
    # a row is one line in EVAL_METRICS
    assert any(m.key == "calibration.ece" for m in html_report.EVAL_METRICS)


def test_odd_names_are_text_everywhere(tmp_path):
    """Class names, titles, swept overrides and errors are data: shown as their characters
    (unprintable ones escaped, as in the Markdown reports), never as markup."""
    report = odd_report()
    (tmp_path / "report.json").write_text(json.dumps(report))
    write_eval_report(tmp_path)
    text = (tmp_path / "report.html").read_text()
    parsed, shown = Parsed(text), [visible(n) for n in ODD]
    assert [r[0] for r in parsed.rows if len(r) == 6][1:] == shown  # the per-class table
    assert [r[0] for r in parsed.rows if len(r) == len(ODD) + 1][1:] == shown  # the matrix
    assert {t for t, _ in parsed.tags} <= {
        "html", "head", "meta", "title", "style", "body", "header", "h1", "p", "nav", "a",
        "main", "section", "h2", "table", "tbody", "tr", "td", "th", "thead", "div", "code",
        "footer", "script",
    }  # fmt: skip
    assert len(parsed.scripts) == 3 and "lenet5 on odd|data" in text
    assert_self_contained(text)
    run = RunReport(tmp_path / "run", "<script>x</script> on a|b", config={"name": "</script><b>"})
    (tmp_path / "run").mkdir()
    run.write([{"epoch": 1, "train_loss": float("nan"), "val_acc": 0.5}])
    page = (tmp_path / "run" / "report.html").read_text()
    assert (
        "&lt;script&gt;x&lt;/script&gt; on a|b" in page and "name: &lt;/script&gt;&lt;b&gt;" in page
    )
    # a NaN is a gap, not a crash: the loss chart, with no number at all, is left out
    assert [c["title"] for c in page_data(page)["charts"]] == ["accuracy"]
    assert_self_contained(page)


def _job(sweep: Path, name: str, overrides: list[str], results: dict | None, val_acc=()) -> Path:
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(overrides), job / ".hydra" / "overrides.yaml")
    if results is not None:
        (job / "results.json").write_text(json.dumps(results))
    if val_acc:
        with open(job / "metrics.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["epoch", "train_loss", "val_acc"])
            writer.writerows([[i + 1, 1.0, v] for i, v in enumerate(val_acc)])
    return job


def test_the_sweep_report_links_every_job_and_overlays_their_curves(tmp_path):
    from cnntrain.callbacks import summarize_sweep

    sweep = tmp_path / "multi run"
    a = _job(
        sweep,
        "0_lenet5_mnist",
        ["model=lenet5", "epochs=3"],
        {"test_acc": 0.9, "params": 61706},
        (0.5, 0.7, 0.8),
    )
    b = _job(
        sweep,
        "1_resnet20_mnist",
        ["model=resnet20", "epochs=3"],
        {"test_acc": 0.95, "macro_f1": 0.94},
        (0.6, 0.9),
    )
    _job(sweep, "2_vgg11_mnist", ["model=<b>vgg11</b>", "epochs=3"], None)  # failed: no results
    odd = _job(sweep, "3_odd", ["model=lenet5", "epochs=3"], {"test_acc": 0.1}, ())
    (odd / "metrics.csv").write_text("epoch,val_acc\nnot,a number\n2,\n")
    os.mkfifo(odd / "results.json.fifo")
    (a / "report.html").write_text("<p>job a</p>")
    (b / "report.html").write_text("<p>job b</p>")
    rows = summarize_sweep(sweep)
    write_sweep_report(sweep, rows)
    text = (sweep / "report.html").read_text()
    parsed = Parsed(text)
    links = [
        attrs["href"]
        for tag, attrs in parsed.tags
        if tag == "a" and not attrs["href"].startswith("#")
    ]
    assert links == ["1_resnet20_mnist/report.html", "0_lenet5_mnist/report.html"]  # best first
    header = parsed.rows[0]
    assert header[:4] == ["job", "swept", "status", "test acc"] and "macro-F1" in header
    jobs = {r[0]: r for r in parsed.rows[1:]}
    assert jobs["1_resnet20_mnist"][header.index("macro-F1")] == "0.9400"
    assert jobs["0_lenet5_mnist"][header.index("params")] == "61,706"
    assert jobs["2_vgg11_mnist"][2] == "failed" and jobs["2_vgg11_mnist"][1] == "model=<b>vgg11</b>"
    (chart,) = page_data(text)["charts"]
    assert chart["x"] == [1, 2, 3]
    assert [s["values"] for s in chart["series"]] == [[0.6, 0.9, None], [0.5, 0.7, 0.8]]
    assert [s["label"] for s in chart["series"]] == [
        "1_resnet20_mnist: model=resnet20",
        "0_lenet5_mnist: model=lenet5",
    ]
    assert_self_contained(text)


def test_an_odd_file_in_a_folder_is_skipped_not_followed(tmp_path):
    """A FIFO where a figure or metrics.csv would be (opening it would block), a file that is
    not a PNG, a report.json that is not an object: left out, the page written."""
    from cnntrain.htmlpage import png, read_json

    os.mkfifo(tmp_path / "reliability.png")
    (tmp_path / "misclassified.png").write_text("not a png")
    assert (
        png(tmp_path / "reliability.png", "x") == ""
        and png(tmp_path / "misclassified.png", "x") == ""
    )
    assert html_report.read_metrics_csv(tmp_path / "reliability.png") == []
    (tmp_path / "report.json").write_text("[1, 2]")
    assert read_json(tmp_path / "report.json") is None and write_eval_report(tmp_path) is None
    (tmp_path / "report.json").write_text(
        json.dumps({"top1": 0.5, "per_class": "?", "confusion_matrix": [[1]]})
    )
    write_eval_report(tmp_path)
    text = (tmp_path / "report.html").read_text()
    assert ["top-1 accuracy", "0.5000"] in Parsed(text).rows and "<img" not in text


def test_the_page_template_ships_in_the_package():
    from importlib.resources import files

    folder = files("cnntrain") / "html"
    for name in (
        "page.html",
        "report.css",
        "report.js",
        "uPlot.iife.min.js",
        "uPlot.min.css",
        "uPlot.LICENSE",
    ):
        assert (folder / name).is_file(), name
    assert "MIT License" in (folder / "uPlot.LICENSE").read_text()
    assert "(v1.6.32)" in (folder / "uPlot.iife.min.js").read_text()[:100]
