"""Reproducibility modes: what makes an op's output bytes the same on every x86-64 CPU.

This module never imports torch at import time: :func:`apply` must run *before* torch is
imported (the CLI calls it first; a Python API user calls it before ``import torch``), and
:func:`configure_torch` right after the import, before the first op.

``strict``
    Output bytes depend only on the recipe, the inputs and the library versions; not on the
    CPU model, its instruction sets, the core count or the user's thread settings.  Lock
    files record the class ``cpu-strict`` (and the library versions).
``platform``
    torch's own choices (best ISA, one thread per core, MKL's fastest path): faster, but a
    digest holds only for the platform it was made on, which the lock records, e.g.
    ``cpu avx512 2 threads torch 2.13.0+cpu``.

Evidence (torch 2.13.0+cpu wheel: BLAS/LAPACK = MKL 2024.2 statically linked into
libtorch_cpu, oneDNN 3.12, GNU OpenMP; a 2-core AMD EPYC with AVX-512).  The golden
pipeline (tests/golden/pipeline.py: 37 steps, every op and method) ran in fresh
subprocesses on the same input files, one setting changed at a time from the machine's
defaults; the number is how many of the 37 step digests changed:

==========================================  ===========================================
setting changed (platform mode)             steps whose digest changed
==========================================  ===========================================
ATEN_CPU_CAPABILITY=avx2 (machine: avx512)  34: every finetune and unlearn, and all
                                            that follows from them
ATEN_CPU_CAPABILITY=default                 37: also every load with a fresh head or
                                            init_seed (``normal_`` has an AVX2 path),
                                            and the random input models themselves
MKL_CBWR=COMPATIBLE                         34 (as avx2)
MKL_CBWR=AVX2 or AVX512, MKL_ENABLE_        0 on this AMD CPU: MKL ignores the ISA
INSTRUCTIONS=AVX2                           branches on non-Intel CPUs (reads back AUTO)
                                            and runs its AVX2 path anyway; on an Intel
                                            AVX-512 CPU MKL takes other kernels
threads 1 or 4 (vs 2); one core (taskset)   2: the BERT full fine-tune and its evaluation
ONEDNN_MAX_CPU_ISA=AVX2 or SSE41            3: the BERT fine-tunes (GELU runs in oneDNN)
torch.use_deterministic_algorithms off      0 (training turns it on anyway)
==========================================  ===========================================

With every strict setting below, all 37 digests (and the input models) were identical
under each of those changes, under all of them at once, on one core, and with MKL at 1, 2
or 4 threads.  Dropping one strict setting at a time:

* ATen capability not pinned: 34-37 steps differ between avx2 and avx512 (table above).
* ``MKL_CBWR`` unset: the same bytes as with it *on this CPU* whatever
  ``MKL_ENABLE_INSTRUCTIONS``, but 34 steps differ from the COMPATIBLE path, which is the
  only branch MKL runs alike on Intel and AMD CPUs.
* ATen threads not fixed (1 vs 2 vs 4, even with MKL strict): the BERT full fine-tune and
  the evaluation differ.  The cause is LayerNorm's backward (weight and bias gradients are
  summed per thread, then across threads) and ATen's parallel reductions; GEMMs, forward
  activations and losses were identical.
* oneDNN left on: its GELU changes with ``ONEDNN_MAX_CPU_ISA`` (3 steps).  Off, GELU
  runs in ATen at the pinned capability and ``ONEDNN_MAX_CPU_ISA`` no longer matters.
* ``STRICT`` in ``MKL_CBWR`` and deterministic algorithms: no digest changed without them
  here; STRICT is what MKL documents for GEMM results independent of the thread count and
  of memory alignment, which lets strict mode give MKL every core (measured: MKL at 1, 2
  and 4 threads under one ATen thread, on two cores and on one, gave the same bytes).
* ``ONEDNN_MAX_CPU_ISA``, ``MKL_DYNAMIC``, ``OMP_DYNAMIC``: not needed (oneDNN is off, MKL
  is strict); a user's value of the MKL ones is removed all the same.

Not pinned, and why: glibc's libm picks FMA/AVX2 variants of its double functions by CPU
(``GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX2,-FMA,-AVX,-AVX512F`` stands in for a CPU without
them): Python's ``math.sin/cos/exp/pow`` then differ in the last bit for about 0.05% of
arguments, while torch's float32 ops at the default capability did not change at all, nor
did any golden digest in strict mode (slerp's and DARE's ``math`` scalars enter float32
tensor ops, which round them to float32; a last-bit double change rarely survives that).
A metric stored as a Python float computed with ``math`` (perplexity = ``math.exp``) is
the residual exposure.  The tunable is read by the dynamic loader at process start, so it
could only be pinned by re-executing the process.

When torch reads each setting (measured): ``ATEN_CPU_CAPABILITY`` once, lazily, at the first
kernel dispatch (set after ``import torch`` but before the first op it still works; after
the first op it is ignored); ``ONEDNN_MAX_CPU_ISA`` at oneDNN's first primitive; ``MKL_CBWR``
at MKL's first call.  Only "before torch is imported" is safe whatever a library does at
import, hence :func:`apply`'s contract; :func:`configure_torch` checks that ATen's capability
and MKL's branch really are the strict ones and raises if something ran an op too early.

Cost, measured on that 2-core machine while other jobs shared it (pipeline seconds, wall;
multi-threaded runs there varied 4x from run to run, single-threaded ones by ~20%):

* golden pipeline: platform (2 threads) 5.8-15.5 s, strict 4.6-8.1 s: no cost (its tiny
  models gain from one ATen thread);
* MiniLM-sized BERT classification fine-tune (hidden 384, 6 layers, seq 64, batch 16, 20
  steps): platform at 1 thread 22-33 s, strict 46-51 s with MKL at 1 thread: 1.6-2.1x
  (CPU time 1.9-2.0x).  Nearly all of it is MKL's COMPATIBLE GEMMs: strict with ATen's
  AVX2 kernels took 42-43 s, strict without MKL_CBWR 25 s.  With MKL on both cores it was
  63-75 s on the loaded machine; on an idle many-core one MKL's threads should pay off.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping
from importlib import metadata
from pathlib import Path

MODES = ("strict", "platform")

#: ATen intra-op threads in strict mode.  LayerNorm's backward and ATen's large reductions
#: split their sums by thread, so their bytes depend on the *number* of ATen threads (not on
#: the cores: the same number on one core gave the same bytes).  One thread: no split at all.
STRICT_THREADS = 1

#: MKL's threads in strict mode; None: every core this process may use.  One: with two, a
#: strict unlearn step run twice in one process (and in fresh processes, now and then) gave
#: different bytes, although each GEMM alone gave the same bytes at 1, 2 and 4 threads; MKL
#: picks its thread count per call at run time (MKL_DYNAMIC, on by default), the likely
#: reason: which calls split their work would depend on timing.  With one thread every run
#: agreed.  It cost 15% on a 1024x576x1536 GEMM (MKL's COMPATIBLE path gains little from a
#: second core).
STRICT_MKL_THREADS: int | None = 1

#: Environment for strict mode, set by :func:`apply` before torch is imported.
STRICT_ENV: dict[str, str] = {
    # ATen's CPU kernels are compiled per ISA (default, AVX2, AVX-512) and picked at the first
    # dispatch; vector widths and vectorised math (Sleef exp/log/tanh, normal_'s AVX2 path)
    # differ in the last bits.  ``default`` runs the same code on every CPU.
    "ATEN_CPU_CAPABILITY": "default",
    # MKL's conditional numerical reproducibility: COMPATIBLE is the one code path MKL runs
    # alike on Intel and AMD CPUs (on AMD it refuses the ISA branches); STRICT makes GEMM
    # independent of the thread count and memory alignment.
    "MKL_CBWR": "COMPATIBLE,STRICT",
    # ATen's thread pool size; configure_torch also sets it through torch's API.
    "OMP_NUM_THREADS": str(STRICT_THREADS),
    # Not a bytes matter (WordPiece/BPE output does not depend on it): the fork warning.
    "TOKENIZERS_PARALLELISM": "false",
    # cuBLAS needs a fixed workspace for deterministic GEMMs (device: cuda; must be set
    # before the first cuBLAS call).
    "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
}

#: Removed in strict mode: each changes MKL's or oneDNN's kernels or threads beyond what
#: STRICT_ENV pins (MKL_NUM_THREADS would also become torch's thread count).
STRICT_UNSET = ("MKL_ENABLE_INSTRUCTIONS", "MKL_NUM_THREADS", "MKL_DYNAMIC", "MKL_DEBUG_CPU_TYPE",
                "OMP_THREAD_LIMIT", "OMP_DYNAMIC")

#: Variables that are part of the platform in platform mode.
PLATFORM_VARS = (("MKL_CBWR", "mkl_cbwr"), ("MKL_ENABLE_INSTRUCTIONS", "mkl_isa"),
                 ("ONEDNN_MAX_CPU_ISA", "onednn"), ("DNNL_MAX_CPU_ISA", "onednn"))

_MKL_COMPATIBLE_STRICT = 0x10003  # MKL_CBWR_COMPATIBLE (3) | MKL_CBWR_STRICT (0x10000)
_NOT_WARNED = ("TOKENIZERS_PARALLELISM", "CUBLAS_WORKSPACE_CONFIG")

_state: dict = {"mode": None, "overridden": {}}


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"reproducible: expected one of {', '.join(MODES)}, got {mode!r}")
    return mode


def apply(mode: str, environ: MutableMapping[str, str] = os.environ) -> dict[str, tuple[str, str | None]]:
    """Set the process environment for ``mode``; call before torch is imported.

    ``strict`` sets :data:`STRICT_ENV`, overriding the user's value of any of those
    variables, and removes :data:`STRICT_UNSET`.  Returns (and remembers, for
    :func:`override_warning`) ``{name: (user value, value now or None)}`` for each user
    setting it changed.  ``platform`` changes nothing.
    """
    check_mode(mode)
    overridden: dict[str, tuple[str, str | None]] = {}
    if mode == "strict":
        for name, value in STRICT_ENV.items():
            old = environ.get(name)
            if old is not None and old != value and name not in _NOT_WARNED:
                overridden[name] = (old, value)
            environ[name] = value
        for name in STRICT_UNSET:
            old = environ.pop(name, None)
            if old is not None:
                overridden[name] = (old, None)
    _state.update(mode=mode, overridden=overridden)
    return overridden


def override_warning() -> str | None:
    """One line naming what strict mode overrode (for the CLI to print), or None."""
    over = _state.get("overridden") or {}
    if not over:
        return None
    parts = [f"{n}={old} -> {'unset' if new is None else new}" for n, (old, new) in over.items()]
    return ("reproducible: strict overrides " + ", ".join(parts)
            + " (reproducible: platform keeps them; digests then hold on this platform only)")


def configure_torch(mode: str, device: str = "cpu") -> None:
    """Settings made through torch's API; call right after ``import torch``, before any op.

    Strict: ``torch.set_num_threads(STRICT_THREADS)`` (the variable is only a default a
    library may change); MKL's own threads to :data:`STRICT_MKL_THREADS` (one: with more, its
    dynamic thread choice made reruns differ);
    ``torch.backends.mkldnn.enabled = False`` (oneDNN's GELU depended on its ISA; off, it
    runs in ATen); ``torch.use_deterministic_algorithms(True)``.  Then checks that ATen runs
    its ``default`` kernels and MKL the COMPATIBLE,STRICT branch: RuntimeError if torch ran
    an op before :func:`apply`.
    Platform: deterministic algorithms for ``device: cuda`` (run to run on one GPU).
    """
    check_mode(mode)
    import torch

    if device == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", STRICT_ENV["CUBLAS_WORKSPACE_CONFIG"])
        torch.use_deterministic_algorithms(True, warn_only=True)
    if mode != "strict":
        return
    if device == "cpu":
        torch.use_deterministic_algorithms(True)
    torch.set_num_threads(STRICT_THREADS)
    _mkl_threads(STRICT_MKL_THREADS or cores())
    torch.backends.mkldnn.enabled = False  # type: ignore[assignment]  # a ContextProp
    cap = torch.backends.cpu.get_cpu_capability()
    if cap != "DEFAULT":
        raise RuntimeError(
            f"reproducible: strict needs ATen's default CPU kernels but {cap} is in use: torch ran "
            "an op before weightflow.dsl.repro.apply('strict'); call it before importing torch")
    branch = mkl_cbwr()
    if branch is not None and branch != _MKL_COMPATIBLE_STRICT:
        raise RuntimeError(
            f"reproducible: strict needs MKL_CBWR=COMPATIBLE,STRICT but MKL runs branch {branch:#x}: "
            "MKL ran before weightflow.dsl.repro.apply('strict'); call it before importing torch")


def _libtorch_cpu():
    import ctypes

    import torch

    try:
        return ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
    except OSError:
        return None


def mkl_cbwr() -> int | None:
    """MKL's CNR setting in force (``mkl_cbwr_get(MKL_CBWR_ALL)``: 0x10003 is
    COMPATIBLE,STRICT), or None where torch's MKL does not export it (another BLAS)."""
    import ctypes

    get = getattr(_libtorch_cpu(), "mkl_serv_cbwr_get", None)
    if get is None:
        return None
    get.restype, get.argtypes = ctypes.c_int, [ctypes.c_int]
    return get(-1)


def _mkl_threads(n: int) -> bool:
    """MKL's thread count for calls from this thread (``mkl_set_num_threads_local``, whose
    exported symbol takes its argument by reference); ``torch.set_num_threads`` sets MKL's
    count too, so this comes after it.  False where MKL is not there."""
    import ctypes

    fn = getattr(_libtorch_cpu(), "mkl_set_num_threads_local", None)
    if fn is None:
        return False
    fn(ctypes.byref(ctypes.c_int(n)))
    return True


# -- describing the platform ---------------------------------------------------------------

def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.partition(":")[2].split())
    return set()


_ISA_ORDER = ("default", "avx2", "avx512")


def aten_isa(flags: set[str] | None = None, environ=os.environ) -> str:
    """The capability ATen will pick, without importing torch: the best the CPU has
    (AVX-512 needs F, BW, VL and DQ; AVX2 needs AVX2 and FMA), lowered to
    ``ATEN_CPU_CAPABILITY`` where that asks for less.  Once torch is imported,
    ``torch.backends.cpu.get_cpu_capability()`` says it for sure."""
    flags = cpu_flags() if flags is None else flags
    best = "default"
    if {"avx2", "fma"} <= flags:
        best = "avx2"
        if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
            best = "avx512"
    asked = (environ.get("ATEN_CPU_CAPABILITY") or "").lower()
    if asked in _ISA_ORDER and _ISA_ORDER.index(asked) < _ISA_ORDER.index(best):
        return asked
    return best


def cores() -> int:
    """CPUs this process may run on (its affinity), as torch counts them."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _platform_threads(environ) -> int:
    torch = sys.modules.get("torch")
    if torch is not None:
        return torch.get_num_threads()
    try:
        n = int(environ.get("OMP_NUM_THREADS", ""))
    except ValueError:
        n = 0
    # torch caps OMP_NUM_THREADS at the cores it sees (OMP_NUM_THREADS=4 on 2 cores: 2)
    return min(n, cores()) if n > 0 else cores()


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def platform_class(mode: str, device: str = "cpu", environ=os.environ) -> str:
    """The environment class a digest holds for, as the lock file records it.

    ``cpu-strict`` in strict mode on CPU.  Otherwise what chose the kernels:
    ``cpu avx512 2 threads torch 2.13.0+cpu`` (with ``mkl_cbwr=...``, ``mkl_isa=...``,
    ``onednn=...`` where the user set them), or ``cuda sm_90 torch 2.13.0`` for
    ``device: cuda``, whose results are not bit-identical across GPU models (that one
    imports torch).
    """
    check_mode(mode)
    torch_version = _version("torch") or "unknown"
    if device == "cuda":
        import torch

        major, minor = torch.cuda.get_device_capability()
        return f"cuda sm_{major}{minor} torch {torch_version}"
    if mode == "strict":
        return "cpu-strict"
    loaded = sys.modules.get("torch")
    isa = loaded.backends.cpu.get_cpu_capability().lower() if loaded is not None else aten_isa(environ=environ)
    threads = _platform_threads(environ)
    out = f"cpu {isa} {threads} thread{'s' if threads != 1 else ''} torch {torch_version}"
    for name, label in PLATFORM_VARS:
        if environ.get(name):
            out += f" {label}={environ[name]}"
    return out


#: Distributions whose versions a locked digest depends on.
LIBRARIES = ("torch", "transformers", "peft", "safetensors", "tokenizers", "numpy")


def library_versions() -> dict[str, str]:
    """{distribution: version} of the libraries that produce the bytes (torch-free)."""
    return {d: v for d in LIBRARIES if (v := _version(d)) is not None}
