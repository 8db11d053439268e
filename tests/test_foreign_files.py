"""Files that are not what a tool expects (another format, a FIFO, a device, a crafted export)
and names that are not what a report expects: one precise line each, and reports that show
every class name as it is, in every format."""

import json
import os
import re
import warnings
import zipfile

import numpy as np
import pytest
import torch

from cnntrain.checkpoint import load_checkpoint, save_checkpoint
from cnntrain.errors import UserError


def core():
    return {
        "model": {"w": torch.zeros(3)},
        "config": {},
        "classes": ["a", "b"],
        "epoch": 0,
        "metrics": {},
    }


def tiny_onnx(
    path, meta: dict, outputs: int | None = None, channels: int = 1, size: int = 4, raw=None
):
    """A crafted ONNX file as anyone can write one: uint8 (batch, C, S, S) -> (batch, outputs)
    logits, with `meta` as its metadata_props (each value JSON-encoded, as cnnexport writes them)
    and `raw` as they are."""
    from onnx import TensorProto, helper, numpy_helper, save

    k = outputs if outputs is not None else len(meta.get("classes") or [0, 1])
    w = numpy_helper.from_array(np.ones((channels * size * size, k), np.float32), "w")
    nodes = [
        helper.make_node("Cast", ["images"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Flatten", ["f"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "w"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info(
                "images", TensorProto.UINT8, ["batch", channels, size, size]
            )
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", k])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    for key, value in {**{k: json.dumps(v) for k, v in meta.items()}, **(raw or {})}.items():
        model.metadata_props.add(key=key, value=value)
    save(model, str(path))
    return path


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    """One file of every kind that is not a cnntrain checkpoint."""
    d = tmp_path_factory.mktemp("foreign")
    torch.save(core(), d / "protocol4.pt", pickle_protocol=4)
    module, x = torch.nn.Linear(4, 2), torch.zeros(2, 4)
    meta = json.dumps({"checkpoint": "/runs/x/checkpoints/best.pt"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in torch 2.14
        torch.jit.save(
            torch.jit.trace(module, x),
            str(d / "model.torchscript.pt"),
            _extra_files={"cnntrain.json": meta},
        )
    torch.export.save(
        torch.export.export(module, (x,)), str(d / "model.pt2"), extra_files={"cnntrain.json": meta}
    )
    tiny_onnx(d / "model.onnx", {})
    with zipfile.ZipFile(d / "photos.pt", "w") as z:
        z.writestr("a.txt", "not torch")
    (d / "empty.pt").touch()
    (d / "folder.pt").mkdir()
    os.mkfifo(d / "fifo.pt")
    os.symlink("/dev/zero", d / "zero.pt")
    return d


FOREIGN = [
    (
        "protocol4.pt",
        r"was saved with pickle protocol 4 .* cannot read; only if you trust the file, re-save it "
        r"with the default protocol: python -c \"import torch; p = '.*protocol4.pt'; "
        r"torch.save\(torch.load\(p, weights_only=False\), p\)\"",
    ),
    (
        "model.torchscript.pt",
        r"is a TorchScript model \(cnnexport format=torchscript\), not a checkpoint; "
        r"pass ckpt=/runs/x/checkpoints/best.pt$",
    ),
    (
        "model.pt2",
        r"is a torch.export ExportedProgram \(cnnexport format=exported_program\), not a "
        r"checkpoint; pass ckpt=/runs/x/checkpoints/best.pt",
    ),
    (
        "model.onnx",
        r"is an ONNX model \(cnnexport format=onnx\), not a checkpoint; pass the best.pt it was "
        r"exported from or run it with cnnpredict model=.*model.onnx",
    ),
    ("photos.pt", r"is a zip archive but not a PyTorch checkpoint \(it has no data.pkl\)"),
    ("empty.pt", r"is empty \(0 bytes\); use another checkpoint"),
    ("folder.pt", r"is a directory, not a regular file \(pass ckpt=/resume= a .pt file"),
    ("fifo.pt", r"is a FIFO, not a regular file \(pass ckpt=/resume= a .pt file"),
    ("zero.pt", r"is a character device, not a regular file"),
]


@pytest.mark.parametrize("name,reason", FOREIGN, ids=[n for n, _ in FOREIGN])
def test_a_foreign_file_as_a_checkpoint_says_what_it_is(foreign, name, reason):
    with pytest.raises(UserError) as e:
        load_checkpoint(foreign / name)
    message = str(e.value)
    assert "\n" not in message and re.match(
        rf"checkpoint {re.escape(str(foreign / name))} {reason}", message
    ), message


def test_protocol_4_cannot_be_read_safely_and_reads_after_the_suggested_re_save(tmp_path):
    """torch 2.14's weights-only unpickler has no FRAME opcode (protocol 4 and 5): the re-save the
    message suggests gives a file it reads."""
    path = tmp_path / "c.pt"
    torch.save(core(), path, pickle_protocol=5)
    with pytest.raises(pickle_error()):
        torch.load(path, weights_only=True)
    with pytest.raises(UserError, match="pickle protocol 5"):
        load_checkpoint(path)
    torch.save(torch.load(path, weights_only=False), path)
    assert load_checkpoint(path)["classes"] == ["a", "b"]


def pickle_error():
    import pickle

    return pickle.UnpicklingError


def compose(config: str, *overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module(config_module="cnntrain.configs", version_base="1.3"):
        return hydra_compose(config_name=config, overrides=list(overrides))


TOOLS = [  # (the tool's function, its config, the foreign file it gets, what it must say)
    ("cnntrain.evaluate:evaluate", "eval", "ckpt=", "fifo.pt", "is a FIFO, not a regular file"),
    ("cnntrain.export:export", "export", "ckpt=", "model.torchscript.pt", "is a TorchScript model"),
    ("cnntrain.predict:predict", "predict", "ckpt=", "zero.pt", "is a character device"),
    ("cnntrain.viz:visualize", "viz", "ckpt=", "protocol4.pt", "was saved with pickle protocol 4"),
    ("cnntrain.train:train", "train", "resume=", "model.pt2", "is a torch.export ExportedProgram"),
]


@pytest.mark.parametrize(
    "tool,config,key,name,needle", TOOLS, ids=[t[0].split(":")[1] for t in TOOLS]
)
def test_every_tool_names_the_foreign_file(foreign, tmp_path, tool, config, key, name, needle):
    import importlib

    from PIL import Image

    module, function = tool.split(":")
    Image.new("L", (8, 8)).save(tmp_path / "x.png")
    extra = [f"inputs={tmp_path / 'x.png'}"] if config in ("predict", "viz") else []
    cfg = compose(config, f"{key}{foreign / name}", *extra, "device=cpu")
    with pytest.raises(UserError) as e:
        getattr(importlib.import_module(module), function)(cfg, tmp_path / "run")
    assert f"{foreign / name} {needle}" in str(e.value) and "\n" not in str(e.value)
    written = [
        p.name for p in (tmp_path / "run").rglob("*") if p.is_file() and not p.name.startswith(".")
    ]
    assert written == [], written


@pytest.mark.e2e
def test_cli_a_fifo_as_checkpoint_is_one_line_without_waiting(foreign, tmp_path):
    from conftest import run_cli

    proc = run_cli(
        "cnneval",
        f"ckpt={foreign / 'fifo.pt'}",
        f"hydra.run.dir={tmp_path / 'ev'}",
        cwd=tmp_path,
        check=False,
        timeout=120,
        env={"PYTHONWARNINGS": None},
    )
    assert proc.returncode == 1 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert proc.stderr.startswith(
        f"error: checkpoint {foreign / 'fifo.pt'} is a FIFO, not a regular file"
    )


# --------------------------------------------------------------------------- crafted exported files
META = {
    "classes": ["a", "b"],
    "image_size": 4,
    "channels": 1,
    "layout": "nchw",
    "input_dtype": "uint8",
    "output": "logits",
    "mean": [0.5],
    "std": [0.25],
    "resize": 4,
}
CRAFTED = [
    ({"classes": "ab"}, "classes='ab' is not a non-empty list of class names (strings)"),
    ({"classes": [1, 2]}, "classes=[1, 2] is not a non-empty list of class names"),
    ({"classes": ["a", "a"]}, "classes=['a', 'a'] is not a list of distinct names ('a' repeats)"),
    ({"image_size": 10**9}, "image_size=1000000000 is not a whole number from 1 to 4096"),
    ({"image_size": "4"}, "image_size='4' is not a whole number from 1 to 4096"),
    ({"image_size": True}, "image_size=True is not a whole number"),
    ({"resize": 2}, "resize=2 is not a whole number from 4 to 4096"),
    ({"channels": 2}, "channels=2 is not 1 or 3"),
    ({"mean": [float("nan")]}, "mean=[nan] is not a list of 1 finite number(s)"),
    ({"std": [0.0]}, "std=[0.0] is not a list of 1 finite number(s) > 0"),
    ({"std": [1.0, 1.0]}, "std=[1.0, 1.0] is not a list of 1 finite number(s) > 0"),
    ({"layout": "hwc"}, "layout='hwc' is not one of nchw, nhwc"),
    ({"input_dtype": "float16"}, "input_dtype='float16' is not one of uint8, float32"),
    ({"output": "scores"}, "output='scores' is not one of logits, probabilities"),
    ({"classes": None}, "classes=None is not a non-empty list"),
]


@pytest.mark.parametrize(
    "change,needle", CRAFTED, ids=[next(iter(c)) + str(i) for i, (c, _) in enumerate(CRAFTED)]
)
def test_crafted_onnx_metadata_is_refused_naming_the_file_and_key(tmp_path, change, needle):
    from cnntrain.predict import _exported

    path = tiny_onnx(tmp_path / "crafted.onnx", {**META, **change}, outputs=2)
    with pytest.raises(UserError) as e:
        _exported(path)
    message = str(e.value)
    assert message.startswith(f"{path}: its metadata {needle}") and "\n" not in message, message
    assert message.endswith("; export the checkpoint again with cnnexport, or predict with ckpt=")


def run_exported(path, pixels=None):
    from cnntrain.predict import _exported

    classes, _, probabilities = _exported(path)
    return probabilities(torch.zeros(1, 1, 4, 4, dtype=torch.uint8) if pixels is None else pixels)


def test_an_onnx_graph_must_give_one_output_per_class_and_take_what_its_metadata_says(tmp_path):
    assert run_exported(tiny_onnx(tmp_path / "ok.onnx", META)).shape == (1, 2)
    for outputs, count in ((2, 3), (5, 1)):  # fewer outputs, or more (an index past the class list)
        path = tiny_onnx(
            tmp_path / f"o{outputs}.onnx", {**META, "classes": list("abc"[:count])}, outputs=outputs
        )
        with pytest.raises(
            UserError,
            match=re.escape(
                f"{path}: its graph gives outputs of shape (1, {outputs}) "
                f"but its metadata lists {count} classes"
            ),
        ):
            run_exported(path)
    path = tiny_onnx(
        tmp_path / "big.onnx", {**META, "image_size": 8, "resize": 8}
    )  # the graph takes 4 px
    with pytest.raises(
        UserError,
        match=re.escape(f"{path}: onnxruntime cannot run it on (1, 1, 8, 8) uint8 images"),
    ):
        run_exported(path, torch.zeros(1, 1, 8, 8, dtype=torch.uint8))


def test_other_files_as_model_say_what_they_are(foreign, tmp_path):
    from cnntrain.predict import _exported

    whole = tiny_onnx(tmp_path / "whole.onnx", META).read_bytes()
    (tmp_path / "cut.onnx").write_bytes(whole[: len(whole) // 2])
    save_checkpoint(core(), tmp_path / "best.pt")
    cases = [
        (
            foreign / "model.pt2",
            "is a torch.export ExportedProgram (cnnexport format=exported_program): "
            "cnnpredict model= runs only ONNX files (cnnexport format=onnx)",
        ),
        (
            foreign / "model.torchscript.pt",
            "is a TorchScript model (cnnexport format=torchscript): cnnpredict "
            "model= runs only ONNX files",
        ),
        (tmp_path / "best.pt", "is a PyTorch checkpoint, not an exported model; pass it as ckpt="),
        (foreign / "fifo.pt", "is a FIFO, not a regular file (pass model= an .onnx file"),
        (tmp_path / "cut.onnx", "cannot be read by onnxruntime ("),
        (tmp_path / "none.onnx", "not found (pass model= an .onnx file"),
    ]
    for path, needle in cases:
        with pytest.raises(UserError) as e:
            _exported(path)
        assert needle in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value), (
            str(e.value)
        )


# --------------------------------------------------------------------------- odd class names in reports
ODD = [
    "a|b",
    "<script>alert(1)</script>",
    "x\ny",
    "*bold*",
    " sp ",
    "$x$",
    "$",
    r"$\frac$",
    "_u_",
    "[l](http://e)",
    "&lt;",
    "`c`",
    "~~s~~",
    "back\\slash",
    "café",
    "\x1b[31mred",
    "\u202eevil",
]


def cells(markdown: str) -> list[list[str]]:
    """The text of every cell of the tables a CommonMark renderer with GFM tables makes of `markdown`."""
    from html.parser import HTMLParser

    md = (
        pytest.importorskip("markdown_it")
        .MarkdownIt("commonmark")
        .enable(["table", "strikethrough"])
    )
    html = md.render(markdown)
    assert (
        "<script" not in html and "<em>" not in html and "<a " not in html and "<s>" not in html
    ), html

    class Cells(HTMLParser):
        rows, cell = [], None

        def handle_starttag(self, tag, attrs):
            if tag == "tr":
                self.rows.append([])
            elif tag in ("td", "th"):
                self.cell = ""
            elif self.cell is not None:
                self.cell += f"<{tag}>"  # markup inside a cell: it would not equal the name

        def handle_endtag(self, tag):
            if tag in ("td", "th"):
                self.rows[-1].append(self.cell)
                self.cell = None

        def handle_data(self, data):
            if self.cell is not None:
                self.cell += data

    parser = Cells(convert_charrefs=True)
    parser.rows = []
    parser.feed(html)
    return parser.rows


def odd_report(names=ODD):
    from cnntrain.report import build_report

    k = len(names)
    confusion = torch.eye(k, dtype=torch.long) * 2
    result = {"acc": 1.0, "top5": 1.0, "loss": 0.1, "num_samples": 2 * k, "confusion": confusion}
    return build_report(
        result,
        classes=names,
        split="test",
        dataset="odd|data",
        model="lenet5",
        checkpoint="/r/b`est.pt",
    )


def test_every_markdown_table_shows_odd_class_names_as_they_are(tmp_path):
    from cnntrain.callbacks import format_table
    from cnntrain.predict import format_predictions
    from cnntrain.report import format_report, write_comparison, write_report
    from cnntrain.text import visible

    shown = [visible(n) for n in ODD]  # a newline or ESC as \n, \x1b: one line, no cursor moves
    report = odd_report()
    write_report(report, tmp_path)
    md = (tmp_path / "report.md").read_text()
    per_class, confusion = cells(md.split("## Confusion")[0]), cells(md.split("## Confusion")[1])
    assert [row[0] for row in per_class[1:]] == shown and all(len(row) == 6 for row in per_class)
    assert (
        confusion[0] == ["true \\ predicted", *shown] and [row[0] for row in confusion[1:]] == shown
    )
    assert md.startswith(
        "# Evaluation: lenet5 on odd\\|data (test)\n\nCheckpoint: ``/r/b`est.pt``\n"
    )
    console = format_report(report).splitlines()
    assert [row[0] for row in cells("\n".join(console[2:]))[1:]] == shown and len(
        console
    ) == 4 + len(ODD)
    assert json.loads((tmp_path / "report.json").read_text())["classes"] == ODD
    predictions = [{"file": f"/x/{n}.png", "top": [(n, 0.5), ("b", 0.25)]} for n in ODD]
    assert [row[1] for row in cells(format_predictions(predictions))[1:]] == [
        f"{s} 0.5000" for s in shown
    ]
    sweep = [{"job": "0", "swept": f"name={n}", "status": "failed", "error": n} for n in ODD]
    assert [row[1] for row in cells(format_table(sweep))[1:]] == [f"name={s}" for s in shown]
    comparison = write_comparison([{**report, "model": n} for n in ODD], tmp_path)
    assert [row[0] for row in cells(comparison)[1:]] == shown


def test_csv_files_read_back_every_odd_class_name(tmp_path):
    """csv quotes a field with a comma, quote or newline: each name reads back whole."""
    import csv

    from cnntrain.predict import write_predictions_csv
    from cnntrain.report import write_predictions

    class Loader:
        def sample_name(self, i):
            return f"/data/{ODD[i]}/{i}.png"

    k = len(ODD)
    result = {
        "target": torch.arange(k),
        "predicted": torch.arange(k).flip(0),
        "confidence": torch.full((k,), 0.5),
    }
    write_predictions(result, Loader(), ODD, tmp_path)
    rows = list(csv.reader(open(tmp_path / "predictions.csv", newline="")))
    assert [r[1] for r in rows[1:]] == ODD and [r[2] for r in rows[1:]] == ODD[::-1]
    write_predictions_csv([{"file": f"/x/{n}", "top": [(n, 0.5)]} for n in ODD], tmp_path / "p.csv")
    assert [r[2] for r in csv.reader(open(tmp_path / "p.csv", newline=""))][1:] == ODD


def test_plots_draw_odd_class_names_as_text_not_mathtext():
    """`$x$` would be typeset, `$\\frac$` fails the whole figure (cnntrain's final test and
    cnneval ended in `ValueError: \\frac`): every label is drawn as its characters."""
    from cnntrain.report import (
        _pyplot,
        confusion_figure,
        per_class_figure,
        prediction_captions,
        samples_figure,
    )
    from cnntrain.text import visible

    plt, report = _pyplot(), odd_report()
    k = len(ODD)

    class Loader:
        def sample(self, i):
            return np.zeros((4, 4, 3), np.uint8)

    result = {"target": torch.arange(k), "predicted": torch.arange(k), "confidence": torch.ones(k)}
    figures = [
        confusion_figure(torch.tensor(report["confusion_matrix"]), ODD, "$t$"),
        per_class_figure(report),
        samples_figure(Loader(), [5, 7], prediction_captions(result, ODD, [5, 7]), "$"),
    ]
    for fig in figures:
        fig.canvas.draw()  # where mathtext is parsed
        texts = [t for t in fig.findobj(plt.Text) if t.get_text()]
        drawn = [
            t._preprocess_math(t.get_text()) for t in texts
        ]  # (the string drawn, as mathtext?)
        assert not any(math for _, math in drawn), drawn
        plt.close(fig)
    ticks = [t._preprocess_math(t.get_text())[0] for t in figures[0].axes[0].get_xticklabels()]
    assert ticks == [visible(n) for n in ODD]
