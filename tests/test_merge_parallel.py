"""The threaded merge writes the bytes of the serial one (issue 15).

``merge_deltas`` computes chunks on ``ChunkPool`` workers and fits TopK thresholds with
their passes mapped over the workers; ``stream_merge`` writes on a thread.  Forced to one
thread (``WEIGHTFLOW_MERGE_THREADS=1``: everything in the calling thread, in order) and to
three, every merge method must give the same digests; the tensors are cut into many small
chunks (``CHUNK_ELEMENTS`` patched) so that chunks of one tensor really run at once and
finish out of order.  The fast kernels are checked bit for bit against the plain
formulations they replace (``torch.where`` chains), special values included.
"""

from __future__ import annotations

import pytest
import torch
from conftest import perturbed_copy, run, write_pipeline

import weightflow.ops.lib.merging as merging
import weightflow.ops.lib.tensors as tensors
from weightflow.ops.lib.sparsify import TopK, keep_bits

STEPS = {
    "ties": "{op: merge, method: ties, base: base, deltas: [da, db, dc], weights: [1.0, 0.5, 0.25], density: 0.5}",
    "ties_sum": "{op: merge, method: ties, base: base, deltas: [da, db], weights: [0.7, -0.4], density: 0.3, "
                "normalize: false}",
    "ties_model": "{op: merge, method: ties, base: base, deltas: [da, db], density: 0.2, trim_scope: model}",
    "dare_ties": "{op: merge, method: dare-ties, base: base, deltas: [da, db], weights: [1.0, 0.5], density: 0.4}",
    "dare_l1": "{op: merge, method: dare-linear, base: base, deltas: [da, db], density: 0.6, rescale: l1}",
    "breadcrumbs": "{op: merge, method: breadcrumbs, base: base, deltas: [da, db], density: 0.5, gamma: 0.05}",
    "della": "{op: merge, method: della, base: base, deltas: [da, db], density: 0.5, epsilon: 0.1}",
    "task_arithmetic": "{op: merge, method: task-arithmetic, base: base, deltas: [da, db], weights: [1.0, -0.5], "
                       "lambda: 0.8}",
    "stock": "{op: merge, method: model_stock, base: base, models: [a, b]}",
    "slerp": "{op: merge, method: slerp, models: [a, b], t: 0.3}",
    "linear": "{op: merge, method: linear, models: [base, a, b], weights: [0.2, 0.5, 0.3]}",
}
LEGACY = {  # a selection that is a plain function (called on the chunks in order): colleagues' methods
    "breadcrumbs_ties": "{op: merge, method: breadcrumbs-ties, base: base, deltas: [da, db], density: 0.5, "
                        "gamma: 0.05, rescale: l1}",
}


FAST = ("ties", "ties_model", "dare_ties", "stock", "breadcrumbs_ties")  # the threaded paths, one each


def _pipeline(root, models, only=None) -> str:
    from weightflow.ops.merge_methods import methods

    steps = dict(STEPS)
    steps.update({k: v for k, v in LEGACY.items() if "breadcrumbs-ties" in methods()})
    steps = {k: v for k, v in steps.items() if only is None or k in only}
    lines = "\n".join(f"  {k}: {v}" for k, v in steps.items())
    return f"""
weightflow: 1
dtype: float32
seed: 3
steps:
  base: {{op: load, source: {models['base']}}}
  a: {{op: load, source: {models['ft_a']}}}
  b: {{op: load, source: {models['ft_b']}}}
  c: {{op: load, source: {models['ft_c']}}}
  da: {{op: extract-delta, model: a, base: base}}
  db: {{op: extract-delta, model: b, base: base}}
  dc: {{op: extract-delta, model: c, base: base}}
{lines}
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("parallel-models")
    return {**{k: str(v) for k, v in tiny_models.items()},
            "ft_c": str(perturbed_copy(tiny_models["base"], root / "ft_c", seed=7, scale=0.01))}


REAL_POOL = merging.ChunkPool


def _digests(root, models, threads: str, monkeypatch, force=(), only=None) -> tuple[dict, list]:
    """Run the pipeline (in ``root``, its store shared by both runs) with ``threads`` merge threads;
    the step digests and, per pool made, whether it had worker threads."""
    monkeypatch.setenv(merging.THREADS_ENV, threads)
    monkeypatch.setattr(tensors, "CHUNK_ELEMENTS", 2048)  # several chunks per tensor: 8-32 rows each
    pools: list[bool] = []

    class Recording(REAL_POOL):  # type: ignore[misc, valid-type]
        def __init__(self, workers):
            super().__init__(workers)
            pools.append(self.parallel)

    monkeypatch.setattr(merging, "ChunkPool", Recording)
    outcome, status = run(write_pipeline(root, _pipeline(root, models, only)), root / "cache", export=False,
                          force=list(force))
    assert all(status[n] == "executed" for n in force)
    return {s.name: s.digest for s in outcome.steps}, pools


def _check_threaded_equals_serial(tmp_path, models, monkeypatch, only=None) -> None:
    serial, serial_pools = _digests(tmp_path, models, "1", monkeypatch, only=only)
    merges = [n for n in serial if n in STEPS or n in LEGACY]
    threaded, threaded_pools = _digests(tmp_path, models, "3", monkeypatch, force=merges, only=only)
    assert serial_pools and not any(serial_pools)
    assert threaded_pools and all(threaded_pools)
    assert len(merges) >= len(only or STEPS) - 1
    differ = {n: (serial[n][:12], threaded[n][:12]) for n in merges if serial[n] != threaded[n]}
    assert not differ, f"threaded merges wrote other bytes than serial ones: {differ}"
    assert len({serial[n] for n in merges}) == len(merges)  # the steps are really different merges


def test_threaded_merges_give_the_serial_bytes(tmp_path, models, monkeypatch):
    _check_threaded_equals_serial(tmp_path, models, monkeypatch, only=FAST)


@pytest.mark.slow
def test_every_merge_method_threaded_gives_the_serial_bytes(tmp_path, models, monkeypatch):
    _check_threaded_equals_serial(tmp_path, models, monkeypatch)


def test_merge_threads_setting(monkeypatch):
    from weightflow.dsl.lang.diagnostics import OpError

    monkeypatch.setenv(merging.THREADS_ENV, "4")
    assert merging.merge_threads() == 4
    for bad in ("0", "two"):
        monkeypatch.setenv(merging.THREADS_ENV, bad)
        with pytest.raises(OpError, match="WEIGHTFLOW_MERGE_THREADS"):
            merging.merge_threads()
    monkeypatch.delenv(merging.THREADS_ENV)
    assert merging.merge_threads() == torch.get_num_threads()


# -- the kernels against their plain formulations ------------------------------------------

SPECIAL = torch.tensor([0.0, -0.0, 0.25, -0.25, 0.5, 1.0, -1.0, float("inf"), float("-inf"), float("nan"), 3e-39])


def _values(n: int, seed: int, special: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 0.01
    if special:  # exact ties in magnitude, signed zeros, infinities, NaN, a denormal
        pick = torch.rand(n, generator=g) < 0.4
        x = torch.where(pick, SPECIAL[torch.randint(0, len(SPECIAL), (n,), generator=g)], x)
    return x


def _plain_ties(terms, ws, normalize):
    """ties_combine as it was written before issue 15: the reference."""
    total = terms[0].clone()
    for t in terms[1:]:
        total.add_(t)
    positive = total >= 0
    zero = torch.zeros((), dtype=torch.float32)
    mixed = torch.zeros_like(terms[0])
    divisor = torch.zeros_like(terms[0]) if normalize else None
    for t, w in zip(terms, ws, strict=True):
        agree = torch.where(positive, t > 0, t < 0)
        mixed.add_(torch.where(agree, t, zero))
        if divisor is not None:
            divisor.add_(agree.to(torch.float32), alpha=w)
    if divisor is not None:
        divisor[divisor == 0] = 1.0
        mixed.div_(divisor)
    return mixed


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int32)


@pytest.mark.parametrize("special", [False, True])
@pytest.mark.parametrize("ws", [[1.0], [1.0, 0.5], [0.7, -0.4], [1.0, -1.0, 0.5], [0.0, 2.0, 0.3]])
def test_ties_combine_is_bit_identical_to_the_plain_formulation(ws, special):
    terms = [_values(5000, seed, special) * w for seed, w in enumerate(ws)]
    for normalize in (False, True):
        want = _plain_ties([t.clone() for t in terms], ws, normalize)
        got = merging.ties_combine([t.clone() for t in terms], ws, normalize)
        assert torch.equal(_bits(got), _bits(want)), normalize


def test_keep_bits_is_where():
    x = _values(4000, 1, special=True)
    keep = torch.rand(4000, generator=torch.Generator().manual_seed(2)) < 0.5
    assert torch.equal(_bits(keep_bits(x, keep)), _bits(torch.where(keep, x, torch.zeros(()))))


@pytest.mark.parametrize("seed", range(4))
def test_topk_by_ordinal_in_parallel_equals_the_sequential_mask(seed):
    """Ties at the threshold (index order) across chunk boundaries, fitted with the passes on
    three workers and taken chunk by chunk in reverse order."""
    x = _values(20000, seed, special=True)
    x = torch.where(torch.isnan(x), torch.zeros(()), x) if seed % 2 else x
    chunks = list(torch.tensor_split(x, [7, 3000, 3001, 9000, 15000]))
    pool = merging.ChunkPool(3)
    try:
        for k in (0, 1, 977, 10000, 19999, 20000, 25000):
            fitted = TopK.fit(lambda: iter(chunks), k, map_chunks=lambda fn: pool.map(fn, chunks))
            sequential = TopK(fitted.threshold, fitted.above, fitted.k)
            want = [sequential.mask(c) for c in chunks]
            for j in reversed(range(len(chunks))):
                assert torch.equal(fitted.mask_at(chunks[j], j), want[j]), (k, j)
                expect = torch.where(want[j], chunks[j], torch.zeros(()))
                assert torch.equal(_bits(fitted.take_at(chunks[j], j)), _bits(expect)), (k, j)
            assert int(sum(m.sum() for m in want)) == min(k, x.numel())
    finally:
        pool.close()


# -- the pool and the ordered writer ------------------------------------------------------

class _ListWriter:
    def __init__(self):
        self.parts: list[tuple[str, bytes]] = []

    def append(self, name, data):
        self.parts.append((name, bytes(data)))


@pytest.mark.parametrize("workers", [1, 3])
def test_ordered_writing_and_errors(workers):
    import time

    from weightflow.dsl.lang.diagnostics import OpError

    def slow(i):
        time.sleep(0.002 * (i % 3))  # later chunks finish first
        return bytes([i])

    pool = merging.ChunkPool(workers)
    try:
        writer = _ListWriter()
        with pool.writing(writer) as out:
            for i in range(40):
                out.put(f"t{i // 10}", pool.submit(slow, i))
        assert writer.parts == [(f"t{i // 10}", bytes([i])) for i in range(40)]

        def fails(i):
            if i == 7:
                raise OpError("chunk 7 is broken")
            return bytes([i])

        writer = _ListWriter()
        with pytest.raises(OpError, match="chunk 7 is broken"), pool.writing(writer) as out:
            for i in range(40):
                out.put("t", pool.submit(fails, i))
        assert [p[1] for p in writer.parts] == [bytes([i]) for i in range(7)]
    finally:
        pool.close()
    assert torch.get_num_threads() >= 1
