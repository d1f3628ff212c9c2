"""Torch-side helpers shared by the ops: reading checkpoints lazily, writing tensors.

Imported only inside ops' ``run`` functions (it imports torch), never by the
language front end.  Reading goes tensor by tensor -- big tensors in row chunks --
so streaming ops hold only the chunks they are combining.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from weightflow.dsl.format.checkpoint import (
    INDEX_SUFFIX,
    HeaderError,
    TensorInfo,
    read_header,
)
from weightflow.dsl.format.dtypes import CODE_OF_NAME, FLOAT_CODES, ITEMSIZE, TABLE
from weightflow.dsl.format.lowrank import lowrank_tensors
from weightflow.dsl.format.quantized import quantized_tensors
from weightflow.dsl.format.sparse import SparseDataError, SparseReader, sparse_parts, sparse_tensors
from weightflow.dsl.lang.diagnostics import OpError
from weightflow.ops.lib.layout import PICKLE_SUFFIXES, SIDE_FILE_GLOBS

# torch's view of the one dtype table (dsl/format/dtypes.py)
ST_TO_TORCH: dict[str, torch.dtype] = {d.code: getattr(torch, d.torch) for d in TABLE if d.torch is not None}
TORCH_TO_ST = {v: k for k, v in ST_TO_TORCH.items()}
TORCH_DTYPES: dict[str, torch.dtype] = {name: ST_TO_TORCH[code] for name, code in CODE_OF_NAME.items()}
FLOAT_ST = FLOAT_CODES
SIDE_FILE_SKIP = {"weightflow.json"}


def st_dtype_of(name: str) -> str:
    """'float32' -> 'F32'."""
    return CODE_OF_NAME[name]


# Big tensors are processed in row chunks of at most this many elements, so streaming
# ops hold a few chunks (tens of MB), not a few whole embedding matrices.
CHUNK_ELEMENTS = 1 << 20  # 4 MB of float32: ~15 live temporaries stay well under 100 MB
_OPEN_LOCK = threading.Lock()  # Checkpoint opens each file once, whichever thread asks first


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
        self._sparse: dict[str, SparseReader] = {}   # tensors stored as mask + values
        self._encoded: dict[str, Any] = {}  # LoRA factors, quantized codes: anything with .dense()
        for f in files:
            try:
                header, start = read_header(f)
                sparse = sparse_tensors(header, start, f)
                encoded = {**lowrank_tensors(header, start, f), **quantized_tensors(header, start, f)}
            except HeaderError as exc:
                raise OpError(f"cannot read {f.name} of {self.label}: {exc.detail}") from None
            except (OSError, ValueError) as exc:
                raise OpError(f"cannot read {f.name} of {self.label}: {exc}") from None
            for name, st in [*sparse.items(), *encoded.items()]:
                if name in self.info:
                    raise OpError(f"tensor '{name}' appears in two shard files of {self.label}")
                self.info[name] = TensorInfo(name, st.dtype, tuple(st.shape))
                if name in encoded:
                    self._encoded[name] = st
                else:
                    self._sparse[name] = SparseReader(st)
            parts = sparse_parts(sparse) | {p for et in encoded.values() for p in et.parts}
            for name, meta in header.items():
                if name == "__metadata__" or name in parts:
                    continue
                if name in self.info:
                    raise OpError(f"tensor '{name}' appears in two shard files of {self.label}")
                if meta["dtype"] not in ST_TO_TORCH:
                    raise OpError(f"tensor '{name}' in {f.name} of {self.label} has unsupported dtype "
                                  f"{meta['dtype']}")
                self.info[name] = TensorInfo(name, meta["dtype"], tuple(meta["shape"]))
                self._loc[name] = (f, start + meta["data_offsets"][0])
        self._handles: dict[Path, object] = {}

    def names(self) -> list[str]:
        return list(self.info)

    def file_of(self, name: str) -> Path:
        """The shard file holding tensor ``name``."""
        if name in self._encoded:
            return self._encoded[name].file
        return self._sparse[name].tensor.file if name in self._sparse else self._loc[name][0]

    def __contains__(self, name: str) -> bool:
        return name in self.info

    def _read(self, path: Path, offset: int, n: int) -> bytearray:
        """``n`` bytes at ``offset``: a positioned read (``pread``, no shared file position), so
        threads may read one checkpoint at once (the parallel merge does)."""
        fh = self._handles.get(path)
        if fh is None:
            with _OPEN_LOCK:
                fh = self._handles.get(path)
                if fh is None:
                    fh = self._handles[path] = open(path, "rb", buffering=0)  # noqa: SIM115 (closed by close())
        buf = bytearray(n)
        got = 0
        while got < n:
            k = os.preadv(fh.fileno(), [memoryview(buf)[got:]], offset + got)
            if k <= 0:
                raise OpError(f"{path.name} of {self.label} is truncated")
            got += k
        return buf

    def get(self, name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """Tensor ``name``, or only its rows ``start:stop`` along the first dimension."""
        info = self.info[name]
        shape = info.shape
        rows = shape[0] if shape else 1
        start, stop = (0, rows) if start is None else (start, stop)
        per_row = info.nbytes // ITEMSIZE[info.dtype] // rows if rows else 0
        dtype = ST_TO_TORCH[info.dtype]
        if name in self._sparse:
            t = self._sparse_range(name, start * per_row, stop * per_row, dtype)
        elif name in self._encoded:
            t = self._encoded_range(name, start * per_row, stop * per_row)
        else:
            path, offset = self._loc[name]
            item = ITEMSIZE[info.dtype]
            buf = self._read(path, offset + start * per_row * item, (stop - start) * per_row * item)
            t = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
        return t.reshape((stop - start,) + tuple(shape[1:])) if shape else t.reshape(())

    def _sparse_range(self, name: str, s: int, e: int, dtype: torch.dtype) -> torch.Tensor:
        """Dense elements [s, e) of a mask + values tensor (decoded by ``dsl.format.sparse``)."""
        reader = self._sparse[name]
        path = reader.tensor.file
        try:
            arr = reader.dense(lambda offset, n: self._read(path, offset, n), s, e)
        except SparseDataError as exc:
            raise OpError(f"sparse tensor '{name}' in {path.name} of {self.label}: {exc.detail}") from None
        return torch.frombuffer(arr, dtype=dtype) if arr.size else torch.empty(0, dtype=dtype)

    def _encoded_range(self, name: str, s: int, e: int) -> torch.Tensor:
        """Dense elements [s, e) of a low-rank or quantized tensor (``dsl.format.lowrank``,
        ``dsl.format.quantized``), float32."""
        et = self._encoded[name]
        try:
            arr = et.dense(lambda offset, n: self._read(et.file, offset, n), s, e)
        except ValueError as exc:
            raise OpError(f"tensor '{name}' in {et.file.name} of {self.label}: {exc}") from None
        return torch.from_numpy(arr) if arr.size else torch.empty(0, dtype=torch.float32)

    def encoding(self, name: str) -> Any:
        """How tensor ``name`` is stored when it is LoRA factors or quantized codes (a
        ``LowRankTensor`` / ``QuantizedTensor``), else None (dense or sparse)."""
        return self._encoded.get(name)

    def is_sparse(self, name: str) -> bool:
        return name in self._sparse

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
