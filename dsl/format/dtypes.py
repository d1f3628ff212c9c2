"""The one dtype table: safetensors codes, element sizes, numpy and torch names, and
the pipeline's spellings (``float32``/``float16``/``bfloat16``).

Torch-free.  The torch side (``ops.lib.tensors``) derives its ``torch.dtype`` maps
from this table, so adding a dtype is one row here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DType:
    code: str            # safetensors spelling: F32, BF16, ...
    itemsize: int        # bytes per element
    numpy: str | None    # numpy dtype holding the values; None where numpy has none (bf16, fp8)
    storage: str         # numpy dtype with the same bytes (the bit pattern for bf16 and fp8)
    torch: str | None    # torch.<name> the readers decode it as; None: weightflow does not read it
    floating: bool
    name: str | None = None  # the pipeline's ``dtype:`` spelling, for the dtypes ops write


# Order matters only for messages that list dtypes (readable ones first, as before).
TABLE: tuple[DType, ...] = (
    DType("F64", 8, "float64", "float64", "float64", True),
    DType("F32", 4, "float32", "float32", "float32", True, "float32"),
    DType("F16", 2, "float16", "float16", "float16", True, "float16"),
    DType("BF16", 2, None, "uint16", "bfloat16", True, "bfloat16"),
    DType("I64", 8, "int64", "int64", "int64", False),
    DType("I32", 4, "int32", "int32", "int32", False),
    DType("I16", 2, "int16", "int16", "int16", False),
    DType("I8", 1, "int8", "int8", "int8", False),
    DType("U8", 1, "uint8", "uint8", "uint8", False),
    DType("BOOL", 1, "bool", "bool", "bool", False),
    DType("U64", 8, "uint64", "uint64", None, False),
    DType("U32", 4, "uint32", "uint32", None, False),
    DType("U16", 2, "uint16", "uint16", None, False),
    DType("F8_E4M3", 1, None, "uint8", None, True),
    DType("F8_E5M2", 1, None, "uint8", None, True),
)

BY_CODE: dict[str, DType] = {d.code: d for d in TABLE}
#: bytes per element of every dtype a safetensors header may name
ITEMSIZE: dict[str, int] = {d.code: d.itemsize for d in TABLE}
#: dtypes the readers decode (dense or sparse); others are refused with a clear error
READABLE: tuple[str, ...] = tuple(d.code for d in TABLE if d.torch is not None)
#: readable floating-point dtypes: the ones ops cast, difference and merge
FLOAT_CODES: frozenset[str] = frozenset(d.code for d in TABLE if d.floating and d.torch is not None)
#: the pipeline's ``dtype:`` choices, and their safetensors codes
OUTPUT_DTYPES: tuple[str, ...] = tuple(d.name for d in TABLE if d.name is not None)
CODE_OF_NAME: dict[str, str] = {d.name: d.code for d in TABLE if d.name is not None}


def storage_dtype(code: str):
    """The numpy dtype with the stored bytes of ``code`` (``uint16`` for BF16)."""
    import numpy as np

    return np.dtype(BY_CODE[code].storage)


def as_float(raw, code: str):
    """Stored bytes (any buffer) of a float or integer dtype as numpy values; BF16 is
    widened to float32 by hand (numpy has no bfloat16)."""
    import numpy as np

    d = BY_CODE[code]
    arr = np.frombuffer(raw, dtype=np.dtype(d.storage))
    if code == "BF16":
        return (arr.astype(np.uint32) << 16).view(np.float32)
    if d.numpy is None:
        raise ValueError(f"dtype {code} has no numpy equivalent")
    return arr
