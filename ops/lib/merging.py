"""The machinery every merge method shares, so a method file declares only its maths.

- ``stream_merge``: writes every tensor of a template checkpoint in row chunks,
  floats computed by the method, everything else copied; peak memory is a few chunks.
- ``open_models``: the checkpoints of whole-model methods, checked to have one layout.
- ``merge_deltas``: generalised task arithmetic, ``base + λ·combine(select(δᵢ))``, the
  way mergekit's TIES, DARE and breadcrumbs are one procedure configured differently.
  A delta method is a pair (``select``, ``consensus``):

  - ``select(params, tensor)`` returns a function chunk → selected (rescaled) chunk for
    one delta and one tensor; the ``SELECTIONS`` below are the ones the methods use.  A
    ``ChunkSelection`` (what they return) computes any chunk from the chunk and its ordinal
    alone, so the chunks of a merge are computed on several threads (``ChunkPool``); a
    plain function is called on the chunks in order.
  - ``consensus(params)`` says whether the selected terms are combined by TIES sign
    election (elect sign(Σ wᵢ·δ̂ᵢ), sum the agreeing terms, divide by their weights when
    ``normalize``) or summed.

Params classes shared by the methods live here too; they import no torch.
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_serializer, model_validator

from weightflow.dsl.lang.spec import DeltaRef, Dtype, DtypeParam, FiniteFloat, ModelRef, SeedParam
from weightflow.ops.lib.params import PerDelta, PerTensor, check_range, for_delta
from weightflow.ops.lib.vocab import TokenizerChoice, any_of_schema

# -- params shared by the methods ---------------------------------------------------------

class MergeCommon(DtypeParam):
    """What every merge method takes."""

    dtype: Dtype | None = Field(None, description="dtype of the merged weights (default: pipeline dtype)")
    tokenizer: TokenizerChoice | None = Field(
        None, description="the merged vocabulary, {source: union | base | STEP}: embedding and head rows "
        "are matched by token string and the chosen tokenizer ships (default: the inputs must line up)",
        json_schema_extra=any_of_schema)

    @model_serializer(mode="wrap")
    def _omit_unset_tokenizer(self, handler):
        """A step key hashes this dump: without ``tokenizer:`` it stays what it was before the
        field existed, so existing pipelines keep their keys."""
        data = handler(self)
        if self.tokenizer is None and isinstance(data, dict):
            data.pop("tokenizer", None)
        return data

    @field_validator("weights", check_fields=False)
    @classmethod
    def _one_weight_per_input(cls, weights, info: ValidationInfo):
        inputs = info.data.get("models", info.data.get("deltas"))
        if weights is not None and inputs is not None and len(weights) != len(inputs):
            what = "models" if "models" in info.data else "deltas"
            raise ValueError(f"expected {len(inputs)} weights, one per entry of '{what}', got {len(weights)}")
        return weights


class DeltaMergeParams(MergeCommon):
    """A base model and deltas added to it (generalised task arithmetic)."""

    base: ModelRef = Field(description="step producing the model the deltas are added to")
    deltas: list[DeltaRef] = Field(min_length=1, description="steps producing deltas")
    weights: list[PerTensor] | None = Field(None, description="one per delta (default: 1 each); "
                                            "negative negates")
    lambda_: FiniteFloat = Field(1.0, alias="lambda", description="scale of the combined deltas")
    vocab: Literal["error", "truncate", "pad"] = Field(
        "error", description="deltas whose first dimension (vocab) exceeds the base's: 'truncate' cuts "
        "them; smaller ones: 'pad' fills with zero delta")

    @model_validator(mode="after")
    def _one_density_per_delta(self):
        """A per-delta ``density`` list has one entry per delta."""
        from weightflow.ops.lib.params import is_per_delta

        density = getattr(self, "density", None)
        if is_per_delta(density) and len(density) != len(self.deltas):
            raise ValueError(f"expected one density per entry of 'deltas' ({len(self.deltas)}), "
                             f"got {len(density)}")
        return self

    @model_validator(mode="after")
    def _vocab_or_tokenizer(self):
        if self.tokenizer is not None and self.vocab != "error":
            raise ValueError(f"give either vocab: {self.vocab} (cut or pad rows by position) or tokenizer: "
                             "(match rows by token string), not both")
        return self


def check_density(v):
    return check_range(v, 0.0, 1.0, "density", lo_open=True)


def densities(value) -> list[float]:
    """Every number a PerTensor (or per-delta) value can take (for cross-field checks)."""
    from weightflow.ops.lib.params import is_per_delta

    if is_per_delta(value):
        return [d for v in value for d in densities(v)]
    return [value] if isinstance(value, (int, float)) else [r.value for r in value]


class DareParams(DeltaMergeParams, SeedParam):
    """The DARE selection's parameters (dare-ties, dare-linear)."""

    density: PerDelta = Field(description="DARE keep probability 1 - p, in (0, 1]; or one per delta")
    seed: int | None = Field(None, ge=0, description="mask seed (default: the pipeline's)")
    rescale: Literal["dare", "l1", "none"] = Field("dare", description="kept values / density (dare), "
                                                   "to the original L1 norm (l1), or unscaled")
    _d = field_validator("density")(check_density)


# -- streaming -----------------------------------------------------------------------------

THREADS_ENV = "WEIGHTFLOW_MERGE_THREADS"
CHUNKS_IN_FLIGHT_PER_WORKER = 3  # queued + computing + waiting to be written: memory ~ a few chunks each


def merge_threads(ctx=None) -> int:
    """How many threads compute a streaming merge's chunks: ``$WEIGHTFLOW_MERGE_THREADS`` if
    set (1: the serial path), else torch's intra-op thread count, the process's CPU budget.
    In strict reproducibility mode, which pins ATen to one thread so that no reduction is
    split by thread count, the budget is the cores this process may use: the chunks' bytes
    do not depend on which thread computes them (each worker runs ATen single-threaded)."""
    import torch

    from weightflow.dsl.lang.diagnostics import OpError

    raw = os.environ.get(THREADS_ENV, "").strip()
    if raw:
        try:
            n = int(raw)
        except ValueError:
            n = 0
        if n < 1:
            raise OpError(f"${THREADS_ENV} must be a whole number of threads >= 1, got {raw!r}")
        return n
    n = torch.get_num_threads()
    if getattr(ctx, "platform", None) == "cpu-strict":
        from weightflow.dsl.engine.repro import cores

        n = max(n, cores())
    return max(1, n)


class _Done:
    """A finished computation, as a Future presents it (the serial path's 'futures')."""

    def __init__(self, fn: Callable, args: tuple):
        self._value, self._error = None, None
        try:
            self._value = fn(*args)
        except BaseException as exc:  # re-raised where the result is taken, as a Future does
            self._error = exc

    @classmethod
    def now(cls, fn: Callable, *args) -> _Done:
        return cls(fn, args)

    def result(self):
        if self._error is not None:
            raise self._error
        return self._value

    def cancel(self) -> bool:
        return False


class ChunkPool:
    """Worker threads that compute a merge's chunks while one writer thread appends the
    finished ones in order (``writing``), so reading, maths, hashing and writing overlap.

    Each worker runs torch single-threaded (``torch.set_num_threads(1)`` is per thread for
    OpenMP and MKL; the process-wide default it also sets is restored on ``close``): W
    workers use W cores, coarse-grained, which a loaded machine does not stall the way it
    stalls an OpenMP team.  torch's elementwise kernels give the same bits on any thread and
    at any thread count, so the parallel path writes the bytes of the serial one (tested in
    tests/test_merge_parallel.py); reductions that feed a result (norms, dot products) stay
    where the caller runs them, in order.  ``workers == 1`` is the serial path: everything
    runs in the calling thread, in order, with no threads at all.
    """

    def __init__(self, workers: int):
        import torch

        self.workers = max(1, int(workers))
        self.window = self.workers * CHUNKS_IN_FLIGHT_PER_WORKER
        self._torch_threads = torch.get_num_threads()
        self._executor = None
        if self.workers > 1:
            from concurrent.futures import ThreadPoolExecutor

            self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="weightflow-merge",
                                                initializer=_single_threaded_torch)

    @property
    def parallel(self) -> bool:
        return self._executor is not None

    def submit(self, fn: Callable, *args):
        """``fn(*args)`` on a worker (in the caller's context variables, under inference
        mode); a Future-like with ``result()``."""
        if self._executor is None:
            return _Done(fn, args)
        import contextvars

        return self._executor.submit(contextvars.copy_context().run, _in_inference_mode, fn, *args)

    def map(self, fn: Callable, items: Iterable) -> Iterator:
        """``fn(item)`` for every item, yielded in order; at most ``window`` computed ahead."""
        if self._executor is None:
            yield from (fn(x) for x in items)
            return
        pending: deque = deque()
        try:
            for x in items:
                pending.append(self.submit(fn, x))
                if len(pending) >= self.window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()

    def writing(self, writer) -> _OrderedAppender:
        """A context in which ``put(name, future)`` appends each future's buffer to ``writer``
        in the order put, at most ``window`` of them pending."""
        return _OrderedAppender(self, writer)

    def close(self) -> None:
        if self._executor is None:
            return
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._executor = None
        import threading

        import torch

        # set_num_threads(1) in the workers also set torch's default for threads started
        # later; put it back from a thread of its own (the caller's settings are untouched)
        t = threading.Thread(target=torch.set_num_threads, args=(self._torch_threads,))
        t.start()
        t.join()


def _single_threaded_torch() -> None:
    import torch

    torch.set_num_threads(1)


def _in_inference_mode(fn: Callable, *args):
    import torch

    with torch.inference_mode():
        return fn(*args)


class _OrderedAppender:
    """See ``ChunkPool.writing``.  The serial pool appends at once, in the caller's thread."""

    def __init__(self, pool: ChunkPool, writer):
        import queue
        import threading

        self.pool, self.writer = pool, writer
        self.error: BaseException | None = None
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._slots = threading.Semaphore(pool.window)
        self._thread = threading.Thread(target=self._drain, name="weightflow-merge-writer", daemon=True) \
            if pool.parallel else None

    def __enter__(self) -> _OrderedAppender:
        if self._thread is not None:
            self._thread.start()
        return self

    def put(self, name: str, future) -> None:
        if self._thread is None:
            self.writer.append(name, future.result())
            return
        self._slots.acquire()
        if self.error is not None:
            self._slots.release()
            raise self.error
        self._queue.put((name, future))

    def _drain(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            name, future = item
            try:
                if self.error is None:
                    self.writer.append(name, future.result())
                else:
                    future.cancel()
            except BaseException as exc:  # handed to the producing thread by put() / __exit__
                self.error = exc
            finally:
                self._slots.release()

    def __exit__(self, kind, exc, tb) -> None:
        if self._thread is None:
            return
        if exc is not None and self.error is None:
            self.error = exc  # stop writing; what is still pending is cancelled or dropped
        self._queue.put(None)
        self._thread.join()
        if exc is None and self.error is not None:
            raise self.error


def _chunk_bytes(compute: Callable, name: str, lo, hi, dtype):
    from weightflow.ops.lib.tensors import tensor_buffer

    return tensor_buffer(compute(name, lo, hi).to(dtype))


def _copy_bytes(template, name: str, lo, hi):
    from weightflow.ops.lib.tensors import tensor_buffer

    return tensor_buffer(template.get(name, lo, hi))


def stream_merge(ctx, template, template_dir, compute: Callable, dtype: str,
                 before: Callable | None = None, pool: ChunkPool | None = None, parallel: bool = False) -> int:
    """Write every tensor of ``template`` in row chunks: floats via ``compute(name, lo, hi)``,
    others copied.  ``before(name)`` runs once per float tensor before its chunks.

    Tensors are visited in order and ``before`` runs in the calling thread.  By default
    ``compute`` does too, chunk after chunk, while a writer thread hashes and writes the
    finished chunks (with ``merge_threads`` > 1; a chunk's tensor must not change after
    ``compute`` returns it).  With ``parallel=True`` ``compute`` runs on the pool's workers,
    possibly while ``before`` of a later tensor runs and while chunks of other tensors are
    computed: it must be thread-safe and read only state that ``before`` of later tensors
    does not overwrite (keep it per tensor name).  Chunks are written in order either way."""
    import torch

    from weightflow.ops.lib.tensors import FLOAT_ST, TORCH_DTYPES, TensorInfo, copy_side_files, row_ranges, st_dtype_of

    target = st_dtype_of(dtype)
    out_dtype = TORCH_DTYPES[dtype]
    plan = [TensorInfo(n, target if i.dtype in FLOAT_ST else i.dtype, i.shape)
            for n, i in template.info.items()]
    writer = ctx.tensor_writer(plan)
    own = pool is None
    workers = pool if pool is not None else ChunkPool(merge_threads(ctx))
    try:
        with ctx.progress(len(plan), "merge") as bar, torch.inference_mode(), workers.writing(writer) as out:
            for info in plan:
                is_float = template.is_float(info.name)
                if is_float and before is not None:
                    before(info.name)
                run = workers.submit if parallel else _Done.now
                for lo, hi in row_ranges(info.shape):
                    if is_float:
                        out.put(info.name, run(_chunk_bytes, compute, info.name, lo, hi, out_dtype))
                    else:
                        out.put(info.name, run(_copy_bytes, template, info.name, lo, hi))
                bar.update(1)
    finally:
        if own:
            workers.close()
    writer.close()
    copy_side_files(template_dir, ctx.out, dtype=dtype)
    return len(plan)


def open_models(arts) -> list:
    """Checkpoints of ``arts``, all checked to hold the same tensors with the same shapes
    (seen in the step's ``tokenizer:`` vocabulary when it sets one: ``vocab.view``)."""
    from weightflow.ops.lib import vocab
    from weightflow.ops.lib.tensors import Checkpoint, check_same_tensors

    ckpts = [vocab.view(Checkpoint(a.path, label=f"model '{a.step}'"), a) for a in arts]
    for c in ckpts[1:]:
        check_same_tensors(ckpts[0], c)
    return ckpts


def tensor_pass(ckpts: list, name: str) -> Iterator[list]:
    """Row chunks of tensor ``name`` of every checkpoint, side by side, as float64."""
    import torch

    from weightflow.ops.lib.tensors import row_ranges

    for lo, hi in row_ranges(ckpts[0].info[name].shape):
        yield [c.get(name, lo, hi).to(torch.float64) for c in ckpts]


# -- deltas --------------------------------------------------------------------------------

class DeltaInput:
    """One delta of a merge: its checkpoint, cut or padded to the base's rows."""

    def __init__(self, art, base, vocab: str):
        from weightflow.dsl.lang.diagnostics import OpError
        from weightflow.ops.lib import vocab as vocabulary
        from weightflow.ops.lib.tensors import Checkpoint

        self.art = art
        self.ckpt = vocabulary.view(Checkpoint(art.path, prefix="delta", label=f"delta '{art.step}'"), art)
        self.rows: dict[str, int] = {}
        for n, info in self.ckpt.info.items():
            if n not in base:
                raise OpError(f"architectures differ: tensor '{n}' of delta '{art.step}' is not in the base")
            want = base.info[n].shape
            if info.shape == want:
                continue
            same_tail = len(info.shape) == len(want) and info.shape[1:] == want[1:]
            if same_tail and info.shape[0] > want[0] and vocab == "truncate":
                self.rows[n] = want[0]
            elif same_tail and info.shape[0] < want[0] and vocab == "pad":
                self.rows[n] = info.shape[0]
            else:
                hint = ""
                if same_tail:
                    hint = (f"; the first dimension (vocab) differs: set vocab: "
                            f"{'truncate' if info.shape[0] > want[0] else 'pad'} to merge anyway")
                raise OpError(f"architectures differ: tensor '{n}' has shape {list(info.shape)} in delta "
                              f"'{art.step}' but {list(want)} in the base{hint}")

    def chunk(self, name: str, lo: int, hi: int, shape):
        """Rows lo:hi of the delta as float32, cut or zero-padded to the base's rows."""
        import torch

        avail = self.rows.get(name)
        if avail is None:
            return self.ckpt.get(name, lo, hi).to(torch.float32)
        out = torch.zeros((hi - lo,) + tuple(shape[1:]), dtype=torch.float32)
        top = min(hi, avail)
        if top > lo:
            out[: top - lo] = self.ckpt.get(name, lo, top).to(torch.float32)
        return out


@dataclass
class TensorOfDelta:
    """What a selection sees: one delta's view of one tensor."""

    name: str
    numel: int
    index: int                      # the delta's position in ``deltas``
    delta: DeltaInput
    chunks: Callable[[], Iterator]  # re-iterable: the tensor's row chunks, float32
    seed: int
    prepared: Any = None            # what the selection's ``prepare`` computed for this delta
    starts: list[int] = field(default_factory=list)  # flat element offset of each chunk
    map_chunks: Callable[[Callable], Iterable] | None = None  # fn -> fn(chunk) per chunk, in order

    def each(self, fn: Callable) -> Iterable:
        """``fn(chunk)`` for every chunk in order, computed on the merge's workers when it has them."""
        return self.map_chunks(fn) if self.map_chunks is not None else (fn(c) for c in self.chunks())


class ChunkSelection:
    """A selection of one delta tensor chunk by chunk, where a chunk's result depends only
    on the chunk and its ordinal ``j`` in the tensor: ``at(c, j)`` may run in any order and
    on any thread (the merge's workers call it so).  Called as a plain selection function,
    ``sel(c)``, it takes the chunks one after another in order.  ``fresh``: ``at`` returns a
    new tensor the caller may modify in place.

    A selection may instead return any function of the chunk; the merge then computes that
    tensor's chunks one after another, in order."""

    def __init__(self, at: Callable, fresh: bool = False):
        self.at = at
        self.fresh = fresh
        self._next = 0

    def __call__(self, c):
        j, self._next = self._next, self._next + 1
        return self.at(c, j)


Selection = Callable[[Any, TensorOfDelta], Callable]


def keep_all(p, t: TensorOfDelta) -> Callable:
    """Task arithmetic: every element of the delta."""
    return ChunkSelection(lambda c, j: c)


@dataclass(frozen=True)
class ModelTrim:
    """``trim_scope: model``: one delta's model-wide top-k, and where each tensor's chunks
    start in the stream it was fitted over."""

    topk: Any
    first_chunk: dict[str, int]


def magnitude_trim(p, t: TensorOfDelta) -> Callable:
    """TIES' trim: the top-``density`` elements by magnitude (per tensor, or model-wide
    with ``trim_scope: model``, fitted in ``prepare_magnitude_trim``)."""
    from weightflow.ops.lib.params import resolve
    from weightflow.ops.lib.sparsify import TopK, count_for

    if isinstance(t.prepared, ModelTrim):
        sel, first = t.prepared.topk, t.prepared.first_chunk[t.name]
    else:
        dens = resolve(for_delta(p.density, t.index), t.name)
        sel = TopK.fit(t.chunks, count_for(dens, t.numel), map_chunks=t.map_chunks)
        first = 0
    return ChunkSelection(lambda c, j: sel.take_at(c, first + j), fresh=True)


# Its fit only maps histograms over the chunks on the workers and adds integers: the
# deltas' fits of one tensor may run at once, each from a planning thread of its own.
magnitude_trim.fits_concurrently = True  # type: ignore[attr-defined]


def prepare_magnitude_trim(p, base, deltas: list[DeltaInput], chunks_of) -> dict:
    """``trim_scope: model``: one top-k threshold over all of a delta's float tensors."""
    from weightflow.ops.lib.sparsify import TopK, count_for
    from weightflow.ops.lib.tensors import row_ranges

    if getattr(p, "trim_scope", "tensor") != "model":
        return {}
    order = [n for n in base.names() if base.is_float(n)]
    fitted = {}
    for i, d in enumerate(deltas):
        names = [n for n in order if n in d.ckpt]

        def all_chunks(d=d, names=names):
            for n in names:
                yield from chunks_of(d, n)()
        first, at = {}, 0
        for n in names:
            first[n] = at
            at += len(list(row_ranges(base.info[n].shape)))
        numel = sum(math.prod(base.info[n].shape) for n in names)
        over = getattr(chunks_of, "map_over", None)  # on the merge's workers
        each = (lambda fn, d=d, names=names, over=over: over(d, names, fn)) if over else None
        topk = TopK.fit(all_chunks, count_for(float(for_delta(p.density, i)), numel), map_chunks=each)
        fitted[i] = ModelTrim(topk, first)
    return fitted


def breadcrumbs(p, t: TensorOfDelta) -> Callable:
    """Model Breadcrumbs: drop the largest ``gamma`` fraction and keep the next ``density``."""
    from weightflow.ops.lib.params import resolve
    from weightflow.ops.lib.sparsify import TopK, keep_bits

    dens = resolve(for_delta(p.density, t.index), t.name)
    n_top = int(p.gamma * t.numel)  # counted as mergekit's breadcrumbs does
    upper = TopK.fit(t.chunks, n_top + int(dens * t.numel), map_chunks=t.map_chunks)
    lower = TopK.fit(t.chunks, n_top, map_chunks=t.map_chunks)
    return ChunkSelection(lambda c, j: keep_bits(c, upper.mask_at(c, j) & ~lower.mask_at(c, j)), fresh=True)


def _l1_factor(chunks, masks) -> float:
    """The factor that gives the kept elements the L1 norm of the whole tensor (summed in
    order in the calling thread: a reduction's bits depend on how it is split)."""
    import torch

    total = kept = 0.0
    for c, m in zip(chunks, masks, strict=True):
        total += float(c.abs().sum(dtype=torch.float64))
        kept += float((c.abs() * m).sum(dtype=torch.float64))
    return total / kept if kept > 0 else 0.0


def dare(p, t: TensorOfDelta) -> Callable:
    """DARE: keep each element with probability ``density`` (masks drawn per seed, delta
    digest and tensor, as ``dare-prune`` draws them), rescale by ``rescale``."""
    from weightflow.ops.lib.params import resolve
    from weightflow.ops.lib.sparsify import keep_bits, random_keep

    drop = 1.0 - resolve(for_delta(p.density, t.index), t.name)
    keep = 1.0 - drop  # the same float as dare-prune's 1 - drop_rate

    def mask(c, start: int):
        return random_keep(t.seed, t.delta.art.digest, t.name, start, start + c.numel(), keep).reshape(c.shape)

    def dare_masks():
        pos = 0
        for c in t.chunks():
            yield mask(c, pos)
            pos += c.numel()
    if p.rescale == "dare":
        factor = 1.0 / keep
    elif p.rescale == "none":
        factor = 1.0
    else:
        factor = _l1_factor(t.chunks(), dare_masks())
    return ChunkSelection(lambda c, j: keep_bits(c * factor, mask(c, t.starts[j])), fresh=True)


def della(p, t: TensorOfDelta) -> Callable:
    """DELLA's MAGPRUNE: keep probabilities density ± epsilon ranked by magnitude per row."""
    from weightflow.ops.lib.params import resolve
    from weightflow.ops.lib.sparsify import della_keep_prob, keep_bits, random_uniform

    dens = resolve(for_delta(p.density, t.index), t.name)

    def part(c, start: int):
        prob = della_keep_prob(c, dens, p.epsilon)
        u = random_uniform(t.seed, t.delta.art.digest, t.name, start, start + c.numel()).reshape(c.shape)
        return u < prob, prob

    def della_parts():
        pos = 0
        for c in t.chunks():
            yield part(c, pos)
            pos += c.numel()
    factor = None
    if p.rescale == "l1":
        factor = _l1_factor(t.chunks(), (m for m, _ in della_parts()))

    def select(c, j):
        m, prob = part(c, t.starts[j])
        scaled = c / prob if p.rescale == "dare" else (c * factor if factor is not None else c)
        return keep_bits(scaled, m)
    return ChunkSelection(select, fresh=True)


def sign_consensus(p) -> bool:
    """TIES' sign election always."""
    return True


def no_consensus(p) -> bool:
    """A plain weighted sum always."""
    return False


def optional_sign_consensus(p) -> bool:
    """TIES' sign election when the step sets ``sign_consensus: true``."""
    return bool(p.sign_consensus)


@dataclass(frozen=True)
class DeltaRecipe:
    """How a delta method selects and combines: see the module docstring."""

    select: Selection
    consensus: Callable[[Any], bool]
    prepare: Callable | None = None
    extra: dict = field(default_factory=dict)


def _warn_other_bases(deltas: list, base_art, ctx) -> None:
    for d in deltas:
        taken = d.art.meta.get("base")
        if taken and taken != base_art.digest:
            ctx.warn(f"delta '{d.art.step}' was taken against base {ctx.name_of(taken)} but is applied "
                     f"to base {ctx.name_of(base_art.digest)} (patching onto a different base)")


TIES_BLOCK = 1 << 17  # elements combined at a time within a chunk (512 kB of float32)


class _DeltaChunks:
    """The row chunks of a delta's tensor, as the base's rows cut them: ``chunks_of(d, name)``
    is re-iterable; ``map_over(d, names, fn)`` yields ``fn(chunk)`` over the tensors' chunks
    in order, read and computed on the pool's workers."""

    def __init__(self, base, pool: ChunkPool):
        self.base, self.pool = base, pool

    def __call__(self, d, name):
        from weightflow.ops.lib.tensors import row_ranges

        shape = self.base.info[name].shape
        return lambda: (d.chunk(name, lo, hi, shape) for lo, hi in row_ranges(shape))

    def map_over(self, d, names: list[str], fn: Callable) -> Iterator:
        from weightflow.ops.lib.tensors import row_ranges

        parts = [(n, lo, hi) for n in names for lo, hi in row_ranges(self.base.info[n].shape)]
        return self.pool.map(lambda part: fn(d.chunk(part[0], part[1], part[2], self.base.info[part[0]].shape)),
                             parts)


@dataclass
class _TensorPlan:
    """One tensor's selections (delta index, selection, weight) and chunk ordinals; ``done``
    events chain the chunks when a selection must see them in order."""

    selections: list
    ordinal: dict
    done: list | None = None


class _DeltaMerge:
    """One ``merge_deltas`` run: ``before`` plans a tensor (its selections, fitted in the
    calling thread, their passes over the chunks on the workers), ``compute`` a chunk."""

    def __init__(self, p, ctx, recipe: DeltaRecipe, base, deltas: list[DeltaInput], pool: ChunkPool):
        self.p, self.ctx, self.recipe, self.base, self.deltas, self.pool = p, ctx, recipe, base, deltas, pool
        self.weights = list(p.weights) if p.weights is not None else [1.0] * len(deltas)
        self.consensus = recipe.consensus(p)
        self.normalize = getattr(p, "normalize", False) if self.consensus else False
        self.chunks_of = _DeltaChunks(base, pool)
        self.prepared: dict = {}
        self.plans: dict[str, _TensorPlan] = {}
        self.planners = None  # threads fitting several deltas' selections of one tensor at once
        if pool.parallel and len(deltas) > 1:
            from concurrent.futures import ThreadPoolExecutor

            self.planners = ThreadPoolExecutor(len(deltas), thread_name_prefix="weightflow-merge-plan")

    def close(self) -> None:
        if self.planners is not None:
            self.planners.shutdown(wait=True, cancel_futures=True)
            self.planners = None

    def before(self, name: str) -> None:
        import threading

        from weightflow.ops.lib.params import resolve
        from weightflow.ops.lib.tensors import row_ranges

        shape = self.base.info[name].shape
        ranges = list(row_ranges(shape))
        per_row = math.prod(shape[1:]) if shape else 1
        starts = [lo * per_row if lo is not None else 0 for lo, _ in ranges]
        numel = max(1, math.prod(shape))
        def mapper(d: DeltaInput) -> Callable[[Callable], Iterable]:
            return lambda fn: self.chunks_of.map_over(d, [name], fn)

        views = [TensorOfDelta(name, numel, i, d, self.chunks_of(d, name), self.ctx.seed, self.prepared.get(i),
                               starts, mapper(d))
                 for i, d in enumerate(self.deltas) if name in d.ckpt]
        if self.planners is not None and len(views) > 1 and getattr(self.recipe.select, "fits_concurrently", False):
            import contextvars

            contexts = [contextvars.copy_context() for _ in views]  # the caller's context variables, one each
            chosen = list(self.planners.map(lambda c, v: c.run(self.recipe.select, self.p, v), contexts, views))
        else:
            chosen = [self.recipe.select(self.p, v) for v in views]
        selections = [(v.index, sel, resolve(self.weights[v.index], name))
                      for v, sel in zip(views, chosen, strict=True)]
        in_order = self.pool.parallel and any(not isinstance(s, ChunkSelection) for _, s, _ in selections)
        self.plans[name] = _TensorPlan(selections, {lo: j for j, (lo, _) in enumerate(ranges)},
                                       [threading.Event() for _ in ranges] if in_order else None)

    def compute(self, name: str, lo, hi):
        plan = self.plans[name]
        j = plan.ordinal[lo]
        if plan.done is None:
            return self.combine(name, lo, hi, plan, j)
        if j:  # a selection that takes chunks in order: wait for the one before (already running)
            plan.done[j - 1].wait()
        try:
            return self.combine(name, lo, hi, plan, j)
        finally:
            plan.done[j].set()

    def combine(self, name: str, lo, hi, plan: _TensorPlan, j: int):
        import torch

        shape = self.base.info[name].shape
        b = self.base.get(name, lo, hi).to(torch.float32)
        terms, ws = [], []
        for i, sel, w in plan.selections:
            c = self.deltas[i].chunk(name, lo, hi, shape)
            if isinstance(sel, ChunkSelection):
                s = sel.at(c, j)
                terms.append(s.mul_(w) if sel.fresh else s * w)
            else:
                terms.append(sel(c) * w)
            ws.append(w)
        if not terms:
            return b
        if not self.consensus:
            acc = terms[0]
            for t in terms[1:]:
                acc = acc.add_(t)
            return b + acc.mul_(self.p.lambda_)
        # TIES in blocks of the chunk: its dozen temporaries then stay in the CPU's caches and
        # in the allocator's free lists (a fresh 4 MB buffer costs a thousand page faults)
        out = torch.empty_like(b)
        flat_b, flat_out, flat_terms = b.reshape(-1), out.reshape(-1), [t.reshape(-1) for t in terms]
        for s in range(0, flat_b.numel(), TIES_BLOCK):
            e = s + TIES_BLOCK
            mixed = ties_combine([t[s:e] for t in flat_terms], ws, self.normalize).mul_(self.p.lambda_)
            torch.add(flat_b[s:e], mixed, out=flat_out[s:e])
        return out


def merge_deltas(inputs, p, ctx, recipe: DeltaRecipe) -> dict:
    """``base + λ·combine(select(δᵢ))``, tensor by tensor in row chunks, the chunks computed
    on ``merge_threads`` workers (see ``ChunkPool``)."""
    from weightflow.ops.lib.tensors import Checkpoint
    from weightflow.ops.lib.vocab import view as vocab_view

    base_art = inputs["base"]
    base = vocab_view(Checkpoint(base_art.path, label=f"base '{base_art.step}'"), base_art)
    deltas = [DeltaInput(a, base, p.vocab) for a in inputs["deltas"]]
    _warn_other_bases(deltas, base_art, ctx)
    pool = ChunkPool(merge_threads(ctx))
    run = _DeltaMerge(p, ctx, recipe, base, deltas, pool)
    try:
        if recipe.prepare:
            run.prepared = recipe.prepare(p, base, deltas, run.chunks_of)
        n = stream_merge(ctx, base, base_art.path, run.compute, p.dtype or ctx.dtype, before=run.before,
                         pool=pool, parallel=True)
    finally:
        run.close()
        pool.close()
    return {"tensors": n}  # content only: how it was made is in the manifest's recipe


def ties_combine(terms: list, ws: list[float], normalize: bool):
    """TIES: elect the sign of the total mass (zero elects +), then sum only the agreeing
    nonzero terms (divided by the agreeing weights when ``normalize``).

    The float operations are those of the plain formulation, ``agree = where(total >= 0,
    t > 0, t < 0)``, ``mixed = Σ where(agree, t, 0)``, ``divisor = Σ wᵢ·agreeᵢ`` with 0 → 1,
    so the bits are too; it is written for speed: ``t·s > 0`` with s = ±1 the elected sign
    is the agreement test, ``where(agree, t, 0)`` keeps bits by masking them (``keep_bits``),
    the first term starts the sum instead of 0 + it, and ``divisor + (divisor == 0)`` turns
    a zero divisor into 1 and leaves the others as they are."""
    import torch

    from weightflow.ops.lib.sparsify import keep_bits

    total = terms[0].clone()
    for t in terms[1:]:
        total.add_(t)
    sign = (total >= 0).to(torch.float32).mul_(2).sub_(1)
    del total
    mixed = None
    divisor = torch.zeros_like(terms[0]) if normalize else None
    for t, w in zip(terms, ws, strict=True):
        agree = (t * sign) > 0
        kept = keep_bits(t, agree)
        mixed = kept if mixed is None else mixed.add_(kept)
        if divisor is not None:
            divisor.add_(agree.to(torch.float32), alpha=w)
    if divisor is not None and mixed is not None:
        divisor.add_(divisor == 0)
        mixed.div_(divisor)
    return mixed
