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
    return {"model": {"w": torch.zeros(3)}, "config": {}, "classes": ["a", "b"], "epoch": 0, "metrics": {}}


def tiny_onnx(path, meta: dict, outputs: int | None = None, channels: int = 1, size: int = 4, raw=None):
    """A crafted ONNX file as anyone can write one: uint8 (batch, C, S, S) -> (batch, outputs)
    logits, with `meta` as its metadata_props (each value JSON-encoded, as cnnexport writes them)
    and `raw` as they are."""
    from onnx import TensorProto, helper, numpy_helper, save

    k = outputs if outputs is not None else len(meta.get("classes") or [0, 1])
    w = numpy_helper.from_array(np.ones((channels * size * size, k), np.float32), "w")
    nodes = [helper.make_node("Cast", ["images"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("Flatten", ["f"], ["flat"], axis=1),
             helper.make_node("MatMul", ["flat", "w"], ["logits"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("images", TensorProto.UINT8, ["batch", channels, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", k])], [w])
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
        torch.jit.save(torch.jit.trace(module, x), str(d / "model.torchscript.pt"), _extra_files={"cnntrain.json": meta})
    torch.export.save(torch.export.export(module, (x,)), str(d / "model.pt2"), extra_files={"cnntrain.json": meta})
    tiny_onnx(d / "model.onnx", {})
    with zipfile.ZipFile(d / "photos.pt", "w") as z:
        z.writestr("a.txt", "not torch")
    (d / "empty.pt").touch()
    (d / "folder.pt").mkdir()
    os.mkfifo(d / "fifo.pt")
    os.symlink("/dev/zero", d / "zero.pt")
    return d


FOREIGN = [
    ("protocol4.pt", r"was saved with pickle protocol 4 .* cannot read; only if you trust the file, re-save it "
                     r"with the default protocol: python -c \"import torch; p = '.*protocol4.pt'; "
                     r"torch.save\(torch.load\(p, weights_only=False\), p\)\""),
    ("model.torchscript.pt", r"is a TorchScript model \(cnnexport format=torchscript\), not a checkpoint; "
                             r"pass ckpt=/runs/x/checkpoints/best.pt$"),
    ("model.pt2", r"is a torch.export ExportedProgram \(cnnexport format=exported_program\), not a "
                  r"checkpoint; pass ckpt=/runs/x/checkpoints/best.pt"),
    ("model.onnx", r"is an ONNX model \(cnnexport format=onnx\), not a checkpoint; pass the best.pt it was "
                   r"exported from or run it with cnnpredict model=.*model.onnx"),
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
    assert "\n" not in message and re.match(rf"checkpoint {re.escape(str(foreign / name))} {reason}", message), message


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
    from hydra import compose as hydra_compose, initialize_config_module

    with initialize_config_module(config_module="cnntrain.configs", version_base="1.3"):
        return hydra_compose(config_name=config, overrides=list(overrides))


TOOLS = [  # (the tool's function, its config, the foreign file it gets, what it must say)
    ("cnntrain.evaluate:evaluate", "eval", "ckpt=", "fifo.pt", "is a FIFO, not a regular file"),
    ("cnntrain.export:export", "export", "ckpt=", "model.torchscript.pt", "is a TorchScript model"),
    ("cnntrain.predict:predict", "predict", "ckpt=", "zero.pt", "is a character device"),
    ("cnntrain.viz:visualize", "viz", "ckpt=", "protocol4.pt", "was saved with pickle protocol 4"),
    ("cnntrain.train:train", "train", "resume=", "model.pt2", "is a torch.export ExportedProgram"),
]


@pytest.mark.parametrize("tool,config,key,name,needle", TOOLS, ids=[t[0].split(":")[1] for t in TOOLS])
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
    written = [p.name for p in (tmp_path / "run").rglob("*") if p.is_file() and not p.name.startswith(".")]
    assert written == [], written


def test_cli_a_fifo_as_checkpoint_is_one_line_without_waiting(foreign, tmp_path):
    from conftest import run_cli

    proc = run_cli("cnneval", f"ckpt={foreign / 'fifo.pt'}", f"hydra.run.dir={tmp_path / 'ev'}", cwd=tmp_path,
                   check=False, timeout=120, env={"PYTHONWARNINGS": None})
    assert proc.returncode == 1 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert proc.stderr.startswith(f"error: checkpoint {foreign / 'fifo.pt'} is a FIFO, not a regular file")


# --------------------------------------------------------------------------- crafted exported files
META = {"classes": ["a", "b"], "image_size": 4, "channels": 1, "layout": "nchw", "input_dtype": "uint8",
        "output": "logits", "mean": [0.5], "std": [0.25], "resize": 4}
CRAFTED = [
    ({"classes": "ab"}, "classes='ab' is not a non-empty list of class names (strings)"),
    ({"classes": [1, 2]}, "classes=[1, 2] is not a non-empty list of class names"),
    ({"classes": ["a", "a"]}, "classes=['a', 'a'] is not a list of distinct names ('a' repeats)"),
    ({"image_size": 10 ** 9}, "image_size=1000000000 is not a whole number from 1 to 4096"),
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


@pytest.mark.parametrize("change,needle", CRAFTED, ids=[next(iter(c)) + str(i) for i, (c, _) in enumerate(CRAFTED)])
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
        path = tiny_onnx(tmp_path / f"o{outputs}.onnx", {**META, "classes": list("abc"[:count])}, outputs=outputs)
        with pytest.raises(UserError, match=re.escape(f"{path}: its graph gives outputs of shape (1, {outputs}) "
                                                      f"but its metadata lists {count} classes")):
            run_exported(path)
    path = tiny_onnx(tmp_path / "big.onnx", {**META, "image_size": 8, "resize": 8})  # the graph takes 4 px
    with pytest.raises(UserError, match=re.escape(f"{path}: onnxruntime cannot run it on (1, 1, 8, 8) uint8 images")):
        run_exported(path, torch.zeros(1, 1, 8, 8, dtype=torch.uint8))


def test_other_files_as_model_say_what_they_are(foreign, tmp_path):
    from cnntrain.predict import _exported

    whole = tiny_onnx(tmp_path / "whole.onnx", META).read_bytes()
    (tmp_path / "cut.onnx").write_bytes(whole[:len(whole) // 2])
    save_checkpoint(core(), tmp_path / "best.pt")
    cases = [(foreign / "model.pt2", "is a torch.export ExportedProgram (cnnexport format=exported_program): "
                                     "cnnpredict model= runs only ONNX files (cnnexport format=onnx)"),
             (foreign / "model.torchscript.pt", "is a TorchScript model (cnnexport format=torchscript): cnnpredict "
                                                "model= runs only ONNX files"),
             (tmp_path / "best.pt", "is a PyTorch checkpoint, not an exported model; pass it as ckpt="),
             (foreign / "fifo.pt", "is a FIFO, not a regular file (pass model= an .onnx file"),
             (tmp_path / "cut.onnx", "cannot be read by onnxruntime ("),
             (tmp_path / "none.onnx", "not found (pass model= an .onnx file")]
    for path, needle in cases:
        with pytest.raises(UserError) as e:
            _exported(path)
        assert needle in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value), str(e.value)
