"""What a file handed to a tool is, told from its metadata and first bytes alone (nothing in it
is run or unpickled), so that a refusal can say "is a TorchScript model" or "is a FIFO" rather
than "truncated" or "not found". Used for ckpt=/resume= (checkpoint.py) and cnnpredict model=."""

from __future__ import annotations

import json
import os
import re
import stat
import zipfile
from pathlib import Path

from cnntrain.errors import UserError

# stat's file types other than a regular file, as a sentence names them
SPECIAL = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)
# ONNX is a protobuf ModelProto: field 1 (ir_version, a small varint), then producer_name (2),
# producer_version (3), domain (4), graph (7) or opset_import (8)
ONNX_HEAD = re.compile(rb"\x08[\x01-\x7f][\x12\x1a\x22\x3a\x42]")
MAX_EMBEDDED_JSON = 1 << 20  # cnnexport's metadata is a few kB; a larger entry is not ours

EXPORTED = {
    "torchscript": "a TorchScript model (cnnexport format=torchscript)",
    "exported_program": "a torch.export ExportedProgram (cnnexport format=exported_program)",
    "onnx": "an ONNX model (cnnexport format=onnx)",
}


def require_regular(path: Path, what: str, fix: str) -> Path:
    """`path` if it is a regular file (or a link to one); else one UserError: "<what> <path> not
    found (<fix>)" or "... is a FIFO, not a regular file (<fix>)". Only stat is called: opening a
    FIFO would wait for a writer, and reading a device (/dev/zero) would never end."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:  # also a link to nothing
        raise UserError(f"{what} {path} not found ({fix})") from None
    except OSError as e:
        raise UserError(f"{what} {path} cannot be read: {e.strerror or e}") from None
    kind = next((name for test, name in SPECIAL if test(mode)), None)
    if kind is not None:
        raise UserError(f"{what} {path} is {kind}, not a regular file ({fix})")
    return path


def _zip_names(path: Path) -> list[str] | None:
    try:
        with zipfile.ZipFile(path) as z:
            return z.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return None


def _pickle_protocol(head: bytes) -> int | None:
    """The protocol of a pickle that starts with `head` (PROTO opcode 0x80, then the number)."""
    return head[1] if len(head) >= 2 and head[0] == 0x80 else None


def identify(path: Path) -> tuple[str, str | None]:
    """(kind, detail) of a regular file: ("empty", None), ("torchscript" | "exported_program" |
    "onnx", None), ("pickle", protocol), ("zip", None) for a zip that is not torch's, ("torch",
    protocol) for torch's own zip format, or ("unknown", None)."""
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        return "empty", None
    names = _zip_names(path) if head.startswith(b"PK") else None
    if names is not None:
        inner = {name.split("/", 1)[1] for name in names if "/" in name}
        if "constants.pkl" in inner or any(name.startswith("code/") for name in inner):
            return "torchscript", None
        if "archive_format" in inner or any(name.startswith("models/") for name in inner):
            return "exported_program", None
        if "data.pkl" not in inner:
            return "zip", None
        with zipfile.ZipFile(path) as z:
            data = next(name for name in names if name.endswith("/data.pkl"))
            return "torch", _pickle_protocol(z.open(data).read(2))
    if ONNX_HEAD.match(head):
        return "onnx", None
    protocol = _pickle_protocol(head)
    return ("pickle", protocol) if protocol is not None else ("unknown", None)


def exported_from(path: Path) -> str | None:
    """The checkpoint an exported file says it came from: its sidecar <file>.json, or the
    cnntrain.json inside a TorchScript/.pt2 archive. Only ever read as JSON, and only a string."""
    found = None
    sidecar = path.with_name(path.name + ".json")
    try:
        if sidecar.is_file() and sidecar.stat().st_size <= MAX_EMBEDDED_JSON:
            found = json.loads(sidecar.read_text())
        else:
            with zipfile.ZipFile(path) as z:
                entry = next(i for i in z.infolist() if i.filename.endswith("/extra/cnntrain.json"))
                if entry.file_size <= MAX_EMBEDDED_JSON:
                    found = json.loads(z.read(entry))
    except (OSError, ValueError, StopIteration, zipfile.BadZipFile, UnicodeDecodeError):
        return None
    checkpoint = found.get("checkpoint") if isinstance(found, dict) else None
    return checkpoint if isinstance(checkpoint, str) and checkpoint.isprintable() else None


def resave_hint(path: Path) -> str:
    return (
        f"only if you trust the file, re-save it with the default protocol: python -c "
        f'"import torch; p = {str(path)!r}; torch.save(torch.load(p, weights_only=False), p)"'
    )


def not_a_checkpoint(path: Path) -> str | None:
    """Why `path`, which torch.load(weights_only=True) could not read, is no checkpoint, where its
    bytes say (None: a damaged or unknown file). Each reason ends with the fix."""
    kind, detail = identify(path)
    if kind in EXPORTED:
        source = exported_from(path)
        where = f" ckpt={source}" if source else " the best.pt it was exported from"
        run = f" or run it with cnnpredict model={path}" if kind == "onnx" else ""
        return f"is {EXPORTED[kind]}, not a checkpoint; pass{where}{run}"
    if kind == "empty":
        return "is empty (0 bytes); use another checkpoint"
    if kind == "zip":
        return "is a zip archive but not a PyTorch checkpoint (it has no data.pkl); use another checkpoint"
    if kind in ("torch", "pickle") and detail is not None and detail > 3:
        return (
            f"was saved with pickle protocol {detail} (torch.save(..., pickle_protocol={detail})), "
            f"which the safe loader torch.load(weights_only=True) cannot read; {resave_hint(path)}"
        )
    return None
