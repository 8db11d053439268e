"""The three report.html pages opened in a real headless browser (Debian's chromium, driven over
the DevTools protocol by tests/browser.py): no console error, no request, the numbers of the
run's files in the DOM, tables that sort when a heading is clicked, charts drawn, a screenshot
that is not blank, and odd class names that stay text. Skipped where /usr/bin/chromium is absent
(.ci/run installs it when it can)."""

import csv
import io
import json
import shutil

import pytest
from browser import CHROMIUM, Browser
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from test_foreign_files import odd_report
from test_html_report import make_cfg

from cnntrain.text import visible

pytestmark = [
    pytest.mark.e2e,  # starts a browser
    pytest.mark.skipif(not CHROMIUM.is_file(), reason="needs chromium (apt-get install chromium)"),
]

HOSTILE = ['<img src=x onerror="window.pwned=1">', "<script>window.pwned=1</script>", "a&amp;b"]


@pytest.fixture(scope="module")
def pages(data_root, tmp_path_factory):
    """A sweep of two jobs (the first trained for real, the second its copy with other
    numbers), cnneval's folder of the first, and an evaluation of classes named like markup."""
    from cnntrain.callbacks import summarize_sweep
    from cnntrain.evaluate import evaluate
    from cnntrain.html_report import RunReport, write_eval_report, write_sweep_report
    from cnntrain.train import train

    root = tmp_path_factory.mktemp("pages")
    sweep, job = root / "sweep", root / "sweep" / "0_lenet5_mnist"
    train(make_cfg(data_root), run_dir=job)
    (job / ".hydra").mkdir(exist_ok=True)  # what Hydra writes in a real sweep
    OmegaConf.save(OmegaConf.create(["optim.lr=0.05"]), job / ".hydra" / "overrides.yaml")
    other = sweep / "1_lenet5_mnist"
    shutil.copytree(job / ".hydra", other / ".hydra")
    OmegaConf.save(OmegaConf.create(["optim.lr=0.5"]), other / ".hydra" / "overrides.yaml")
    history = [dict(r, val_acc=0.2 * r["epoch"]) for r in _csv(job / "metrics.csv")]
    with open(other / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    results = json.loads((job / "results.json").read_text())
    (other / "results.json").write_text(json.dumps({**results, "test_acc": 0.987}))
    RunReport(other, "lenet5 on mnist", epochs=2).write(history, {**results, "test_acc": 0.987})
    write_sweep_report(sweep, summarize_sweep(sweep))
    with initialize_config_module(config_module="cnntrain.configs", version_base="1.3"):
        ecfg = compose(
            config_name="eval", overrides=[f"ckpt={job}/checkpoints/best.pt", "device=cpu"]
        )
    evaluate(ecfg, run_dir=root / "eval")
    odd = root / "odd"
    odd.mkdir()
    (odd / "report.json").write_text(json.dumps(odd_report([*HOSTILE, "x\ny", "\u202eevil"])))
    write_eval_report(odd)
    return {"run": job, "sweep": sweep, "eval": root / "eval", "odd": odd}


def _csv(path):
    return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(open(path))]


@pytest.fixture(scope="module")
def browser():
    b = Browser(width=1280, height=900)
    yield b
    b.close()


def opened(browser, folder):
    """The page of `folder`, loaded, checked for errors and requests."""
    tab = browser.open(folder / "report.html")
    assert tab.problems() == []
    assert tab.requests() == []
    return tab


def column(tab, table: str, index: int) -> list[str]:
    return tab.evaluate(
        f"Array.from(document.querySelectorAll('{table} tbody tr'))"
        f".map(r => r.cells[{index}].textContent)"
    )


def assert_not_blank(png: bytes) -> None:
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    colours = image.getcolors(maxcolors=1 << 20)
    assert image.width >= 1000 and len(colours) > 200, len(colours)
    assert max(n for n, _ in colours) < 0.95 * image.width * image.height  # not one flat colour


def drawn(tab) -> int:
    """How many charts uPlot drew: canvases with coloured pixels."""
    return tab.evaluate(
        """Array.from(document.querySelectorAll('.chart canvas')).filter(c => {
             const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
             for (let i = 0; i < d.length; i += 4) if (d[i+3] && (d[i] !== d[i+1] || d[i+1] !== d[i+2])) return true;
             return false; }).length"""
    )


def test_the_run_report_in_a_browser(browser, pages):
    tab = opened(browser, pages["run"])
    results = json.loads((pages["run"] / "results.json").read_text())
    rows = _csv(pages["run"] / "metrics.csv")
    text = tab.evaluate("document.body.innerText")
    assert f"{results['test_acc']:.4f}" in text and f"{results['params']:,}" in text
    assert column(tab, "#epochs table", 4) == [f"{r['val_acc']:.4f}" for r in rows]
    assert drawn(tab) == 3  # loss, accuracy, lr
    tab.click("#epochs th:nth-child(2)")  # train_loss, ascending: the last epoch first
    losses = [float(v) for v in column(tab, "#epochs table", 1)]
    assert losses == sorted(losses)
    assert_not_blank(tab.screenshot())


def test_the_eval_report_in_a_browser(browser, pages):
    tab = opened(browser, pages["eval"])
    report = json.loads((pages["eval"] / "report.json").read_text())
    assert f"{report['top1']:.4f}" in tab.evaluate("document.body.innerText")
    assert column(tab, "#classes table", 0) == report["classes"]
    tab.click("#classes th:nth-child(6)")  # f1: ascending
    assert column(tab, "#classes table", 5) == sorted(f"{c['f1']:.4f}" for c in report["per_class"])
    assert tab.evaluate("document.querySelector('#classes th:nth-child(6)').ariaSort") == (
        "ascending"
    )
    tab.click("#classes th:nth-child(6)")  # again: descending
    assert column(tab, "#classes table", 5) == sorted(
        (f"{c['f1']:.4f}" for c in report["per_class"]), reverse=True
    )
    assert tab.evaluate("document.querySelectorAll('#mistakes img').length") == 1
    assert tab.evaluate("document.querySelector('#mistakes img').naturalWidth") > 100
    assert_not_blank(tab.screenshot())


def test_the_sweep_report_in_a_browser(browser, pages):
    tab = opened(browser, pages["sweep"])
    assert column(tab, "#jobs table", 0) == ["1_lenet5_mnist", "0_lenet5_mnist"]  # best first
    assert "0.9870" in column(tab, "#jobs table", 3)
    tab.click("#jobs th:nth-child(4)")  # test acc, ascending
    assert column(tab, "#jobs table", 0) == ["0_lenet5_mnist", "1_lenet5_mnist"]
    links = tab.evaluate("Array.from(document.querySelectorAll('#jobs a')).map(a => a.href)")
    assert sorted(links) == sorted(
        (pages["sweep"] / j / "report.html").as_uri() for j in ("0_lenet5_mnist", "1_lenet5_mnist")
    )
    assert drawn(tab) == 1
    legend = tab.evaluate(
        "Array.from(document.querySelectorAll('.u-legend .u-label')).map(l => l.textContent)"
    )
    assert legend[1:] == ["1_lenet5_mnist: optim.lr=0.5", "0_lenet5_mnist: optim.lr=0.05"]
    assert_not_blank(tab.screenshot())
    job = browser.open(pages["sweep"] / "1_lenet5_mnist" / "report.html")  # the link's page
    assert job.problems() == [] and "0.9870" in job.evaluate("document.body.innerText")


def test_class_names_like_markup_stay_text_in_a_browser(browser, pages):
    tab = opened(browser, pages["odd"])
    names = [*HOSTILE, "x\ny", "\u202eevil"]
    assert column(tab, "#classes table", 0) == [visible(n) for n in names]
    assert tab.evaluate("window.pwned === undefined")
    assert tab.evaluate("document.scripts.length") == 3  # the data block, uPlot, report.js
    assert tab.evaluate("document.images.length") == 0
