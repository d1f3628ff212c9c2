"""Torch-side helpers shared by the ops: reading checkpoints lazily, writing tensors.

Imported only inside ops' ``run`` functions (it imports torch), never by the
language front end.  Reading goes tensor by tensor -- big tensors in row chunks --
so streaming ops hold only the chunks they are combining.
"""

from __future__ import annotations

import fnmatch
import json
import shutil
from pathlib import Path
from typing import Iterable

import torch

from weightflow.dsl.checkpoint import INDEX_SUFFIX, TensorInfo, read_header
from weightflow.dsl.diagnostics import OpError
from weightflow.ops._layout import PICKLE_SUFFIXES, SIDE_FILE_GLOBS

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ST_TO_TORCH = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
TORCH_TO_ST = {v: k for k, v in ST_TO_TORCH.items()}
FLOAT_ST = {"F64", "F32", "F16", "BF16"}
SIDE_FILE_SKIP = {"weightflow.json"}


def st_dtype_of(name: str) -> str:
    """'float32' -> 'F32'."""
    return TORCH_TO_ST[TORCH_DTYPES[name]]


# Big tensors are processed in row chunks of at most this many elements, so streaming
# ops hold a few chunks (tens of MB), not a few whole embedding matrices.
CHUNK_ELEMENTS = 1 << 22


class Checkpoint:
    """Lazy view of the safetensors tensors in one directory.

    Tensors (or row ranges of them) are read with plain positioned reads into fresh
    buffers rather than through a memory map: mapped file pages count towards the
    process's resident memory, so a streamed merge over mmaps would look -- and,
    under memory pressure, behave -- like it loaded every input whole.
    """

    def __init__(self, directory: str | Path, prefix: str | None = None, label: str | None = None):
        self.dir = Path(directory)
        self.label = label or str(directory)
        files = sorted(self.dir.glob(f"{prefix}*.safetensors" if prefix else "*.safetensors"))
        if not files:
            pickled = [p.name for p in self.dir.glob("*") if p.suffix in PICKLE_SUFFIXES]
            hint = (f"; found {', '.join(pickled)}: pickle checkpoints are never loaded "
                    "(convert them to safetensors first)") if pickled else ""
            raise OpError(f"no safetensors weights in {self.label}{hint}")
        self.info: dict[str, TensorInfo] = {}
        self._loc: dict[str, tuple[Path, int]] = {}  # name -> (file, absolute data offset)
        for f in files:
            try:
                header, start = read_header(f)
            except (OSError, ValueError) as exc:
                raise OpError(f"cannot read {f.name} of {self.label}: {exc}") from None
            for name, meta in header.items():
                if name == "__metadata__":
                    continue
                if name in self.info:
                    raise OpError(f"tensor '{name}' appears in two shard files of {self.label}")
                if meta["dtype"] not in ST_TO_TORCH:
                    raise OpError(f"tensor '{name}' of {self.label} has unsupported dtype {meta['dtype']}")
                self.info[name] = TensorInfo(name, meta["dtype"], tuple(meta["shape"]))
                self._loc[name] = (f, start + meta["data_offsets"][0])
        self._handles: dict[Path, object] = {}

    def names(self) -> list[str]:
        return list(self.info)

    def __contains__(self, name: str) -> bool:
        return name in self.info

    def get(self, name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """Tensor ``name``, or only its rows ``start:stop`` along the first dimension."""
        info = self.info[name]
        path, offset = self._loc[name]
        fh = self._handles.get(path)
        if fh is None:
            fh = self._handles[path] = open(path, "rb")
        shape = info.shape
        rows = shape[0] if shape else 1
        start, stop = (0, rows) if start is None else (start, stop)
        row_bytes = info.nbytes // rows if rows else 0
        buf = bytearray((stop - start) * row_bytes)
        if buf:
            fh.seek(offset + start * row_bytes)
            if fh.readinto(buf) != len(buf):
                raise OpError(f"tensor '{name}' of {self.label} is truncated")
            t = torch.frombuffer(buf, dtype=ST_TO_TORCH[info.dtype])
        else:
            t = torch.empty(0, dtype=ST_TO_TORCH[info.dtype])
        return t.reshape((stop - start,) + tuple(shape[1:])) if shape else t.reshape(())

    def is_float(self, name: str) -> bool:
        return self.info[name].dtype in FLOAT_ST

    def close(self) -> None:
        for fh in self._handles.values():
            fh.close()
        self._handles.clear()


def row_ranges(shape: tuple[int, ...], max_elements: int | None = None):
    """(start, stop) row ranges covering ``shape``'s first dimension in bounded chunks.

    A 0-d tensor yields (None, None): read it whole.
    """
    if not shape:
        yield None, None
        return
    per_row = 1
    for d in shape[1:]:
        per_row *= d
    step = max(1, (max_elements or CHUNK_ELEMENTS) // max(per_row, 1))
    if shape[0] == 0:
        yield 0, 0
    for lo in range(0, shape[0], step):
        yield lo, min(shape[0], lo + step)


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
