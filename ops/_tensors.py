"""Torch-side helpers shared by the ops: reading checkpoints lazily, writing tensors.

Imported only inside ops' ``run`` functions (it imports torch), never by the
language front end.  Reading goes through safetensors' memory-mapped ``safe_open``,
one tensor at a time, so streaming ops hold only the tensors they are combining.
"""

from __future__ import annotations

import fnmatch
import json
import shutil
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open

from weightflow.dsl.checkpoint import INDEX_SUFFIX, TensorInfo, read_header
from weightflow.dsl.diagnostics import OpError

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ST_TO_TORCH = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
TORCH_TO_ST = {v: k for k, v in ST_TO_TORCH.items()}
FLOAT_ST = {"F64", "F32", "F16", "BF16"}
# Files of a Hugging Face model directory that travel with its weights.
SIDE_FILE_GLOBS = ("*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken")
SIDE_FILE_SKIP = {"weightflow.json"}


def st_dtype_of(name: str) -> str:
    """'float32' -> 'F32'."""
    return TORCH_TO_ST[TORCH_DTYPES[name]]


class Checkpoint:
    """Lazy, memory-mapped view of the safetensors tensors in one directory."""

    def __init__(self, directory: str | Path, prefix: str | None = None, label: str | None = None):
        self.dir = Path(directory)
        self.label = label or str(directory)
        files = sorted(self.dir.glob(f"{prefix}*.safetensors" if prefix else "*.safetensors"))
        if not files:
            pickled = [p.name for p in self.dir.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
            hint = (f"; found {', '.join(pickled)}: pickle checkpoints are never loaded "
                    "(convert them to safetensors first)") if pickled else ""
            raise OpError(f"no safetensors weights in {self.label}{hint}")
        self.info: dict[str, TensorInfo] = {}
        self._file_of: dict[str, Path] = {}
        for f in files:
            header, _ = read_header(f)
            for name, meta in header.items():
                if name == "__metadata__":
                    continue
                if name in self.info:
                    raise OpError(f"tensor '{name}' appears in two shard files of {self.label}")
                self.info[name] = TensorInfo(name, meta["dtype"], tuple(meta["shape"]))
                self._file_of[name] = f
        self._handles: dict[Path, object] = {}

    def names(self) -> list[str]:
        return list(self.info)

    def __contains__(self, name: str) -> bool:
        return name in self.info

    def get(self, name: str) -> torch.Tensor:
        f = self._file_of[name]
        h = self._handles.get(f)
        if h is None:
            h = safe_open(str(f), framework="pt", device="cpu")
            self._handles[f] = h
        return h.get_tensor(name)

    def is_float(self, name: str) -> bool:
        return self.info[name].dtype in FLOAT_ST

    def close(self) -> None:
        self._handles.clear()


def tensor_buffer(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of ``t`` without a copy when it is contiguous."""
    t = t.detach().cpu().contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def info_of(name: str, t_dtype: torch.dtype, shape) -> TensorInfo:
    return TensorInfo(name, TORCH_TO_ST[t_dtype], tuple(shape))


def select(names: Iterable[str], include: list[str] | None, exclude: list[str] | None) -> list[str]:
    """Names matching any ``include`` glob (all when None) and no ``exclude`` glob."""
    out = []
    for n in names:
        if include is not None and not any(fnmatch.fnmatchcase(n, g) for g in include):
            continue
        if exclude and any(fnmatch.fnmatchcase(n, g) for g in exclude):
            continue
        out.append(n)
    return out


def side_files(src: Path) -> list[Path]:
    out = []
    for pattern in SIDE_FILE_GLOBS:
        for f in sorted(src.glob(pattern)):
            if f.is_file() and f.name not in SIDE_FILE_SKIP and not f.name.endswith(INDEX_SUFFIX):
                out.append(f)
    return sorted(set(out))


def copy_side_files(src: Path, out: Path, dtype: str | None = None) -> None:
    """Copy config/tokenizer/generation files; rewrite the config's dtype if given."""
    for f in side_files(src):
        if f.name == "config.json" and dtype is not None:
            cfg = json.loads(f.read_text())
            write_config(out, cfg, dtype)
        else:
            shutil.copyfile(f, out / f.name)


def write_config(out: Path, cfg: dict, dtype: str) -> None:
    """Write config.json deterministically, stating the produced dtype."""
    cfg = dict(cfg)
    cfg.pop("transformers_version", None)  # a library version is not model content
    cfg.pop("quantization_config", None)
    cfg["torch_dtype"] = dtype
    if "dtype" in cfg:
        cfg["dtype"] = dtype
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def check_same_tensors(a: Checkpoint, b: Checkpoint, names: Iterable[str] | None = None) -> None:
    """Fail clearly, naming the first differing tensor, when two checkpoints don't line up."""
    for n in names if names is not None else a.names():
        if n not in b:
            raise OpError(f"architectures differ: tensor '{n}' is in {a.label} but not in {b.label}")
        if a.info[n].shape != b.info[n].shape:
            raise OpError(f"architectures differ: tensor '{n}' has shape {list(a.info[n].shape)} in "
                          f"{a.label} but {list(b.info[n].shape)} in {b.label}")
    if names is None:
        extra = [n for n in b.names() if n not in a]
        if extra:
            raise OpError(f"architectures differ: tensor '{extra[0]}' is in {b.label} but not in {a.label}")
