"""Unit tests for pieces the end-to-end tests only cover as a whole: TopK selection, DARE
masks, the sparse (mask + values) format, the sharded writer, the lock file, the dtype
table and ``quiet_transformers``."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

# --------------------------------------------------------------------------- TopK


def _reference_topk(x: torch.Tensor, k: int) -> torch.Tensor:
    """Largest |x| (float32), ties broken by index order: the mask TopK must produce."""
    flat = x.detach().to(torch.float32).abs().reshape(-1)
    order = torch.argsort(-flat, stable=True)
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[order[:k]] = True
    return keep


def _topk_mask(chunks: list[torch.Tensor], k: int) -> torch.Tensor:
    from weightflow.ops.lib.sparsify import TopK

    fitted = TopK.fit(lambda: iter(chunks), k)
    sel = TopK(fitted.threshold, fitted.above, fitted.k)
    return torch.cat([sel.mask(c).reshape(-1) for c in chunks])


def _cut(x: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    flat, out, pos = x.reshape(-1), [], 0
    for s in sizes:
        out.append(flat[pos:pos + s])
        pos += s
    assert pos == flat.numel()
    return out


def _tied(n: int, seed: int) -> torch.Tensor:
    """Values with many exact ties in magnitude (both signs), including zeros."""
    g = torch.Generator().manual_seed(seed)
    levels = torch.tensor([0.0, 0.25, 0.5, 1.0, 2.0])
    x = levels[torch.randint(0, len(levels), (n,), generator=g)]
    return x * torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_topk_keeps_exactly_k_with_ties_in_index_order(seed):
    x = _tied(997, seed)
    for k in (1, 10, 200, 500, 996):
        got = _topk_mask([x], k)
        assert int(got.sum()) == k
        assert torch.equal(got, _reference_topk(x, k))


@pytest.mark.parametrize("sizes", [[997], [1] * 97 + [900], [3, 500, 1, 493], [8, 8, 981], [496, 501]])
def test_topk_does_not_depend_on_chunk_boundaries(sizes):
    x = _tied(997, 7)
    for k in (5, 300, 640):
        assert torch.equal(_topk_mask(_cut(x, sizes), k), _reference_topk(x, k))


def test_topk_over_a_whole_model_stream():
    g = torch.Generator().manual_seed(3)
    model = {"a": torch.randn(40, 30, generator=g), "b": _tied(500, 4), "c": torch.randn(7, generator=g) * 3}
    chunks = [model["a"][:13], model["a"][13:], model["b"][:250], model["b"][250:], model["c"]]
    flat = torch.cat([t.reshape(-1) for t in model.values()])
    for k in (1, 100, 1000, flat.numel() - 1):
        assert torch.equal(_topk_mask(chunks, k), _reference_topk(flat, k))


def test_topk_edge_counts():
    x = torch.randn(50, generator=torch.Generator().manual_seed(0))
    assert int(_topk_mask([x], 0).sum()) == 0
    assert bool(_topk_mask([x], 50).all()) and bool(_topk_mask([x], 80).all())
    # wider dtypes compare as float32, as the reference does
    assert int(_topk_mask([x.to(torch.float64)], 17).sum()) == 17


def test_count_for_rounding():
    from weightflow.ops.lib.sparsify import count_for

    assert count_for(0.1, 1000) == 100
    assert count_for(0.0001, 1000) == 1  # mergekit keeps at least one
    assert count_for(0.1, 0) == 0
    assert count_for(1 - 0.9, 1000, rounding="round") == 100  # 0.0999... * 1000 rounds to 100


# --------------------------------------------------------------------------- DARE masks


def test_random_keep_does_not_depend_on_chunking_or_order():
    from weightflow.ops.lib.sparsify import RNG_BLOCK, random_keep

    lo, hi = RNG_BLOCK - 3000, RNG_BLOCK + 5000  # the range crosses a generator block
    whole = random_keep(0, "key", "w", lo, hi, 0.3)
    cuts = [lo, lo + 1, lo + 999, RNG_BLOCK - 1, RNG_BLOCK + 7, hi]
    spans = list(zip(cuts[:-1], cuts[1:], strict=True))
    parts = {(a, b): random_keep(0, "key", "w", a, b, 0.3) for a, b in reversed(spans)}
    assert torch.equal(torch.cat([parts[span] for span in spans]), whole)
    assert torch.equal(random_keep(0, "key", "w", lo, hi, 0.3), whole)  # no hidden state


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_random_keep_fraction_is_near_p(p):
    from weightflow.ops.lib.sparsify import random_keep

    n = 1 << 20
    frac = float(random_keep(1, "key", "w", 0, n, p).float().mean())
    assert abs(frac - p) < 5 * (p * (1 - p) / n) ** 0.5


def test_random_keep_differs_per_key_name_and_seed():
    from weightflow.ops.lib.sparsify import random_keep

    n, p = 20000, 0.5
    ref = random_keep(0, "key", "w", 0, n, p)
    for other in (random_keep(0, "key2", "w", 0, n, p), random_keep(0, "key", "w2", 0, n, p),
                  random_keep(1, "key", "w", 0, n, p)):
        agree = float((other == ref).float().mean())
        assert 0.45 < agree < 0.55  # independent masks agree on about half the elements


# --------------------------------------------------------------------------- sparse format

BF16 = "BF16"


def _sparse_tensor(n: int, density: float, seed: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) + 0.5
    x[torch.rand(n, generator=g) >= density] = 0
    return x.to(dtype)


def _storage(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


@pytest.mark.parametrize("dtype,code", [(torch.float32, "F32"), (torch.bfloat16, BF16)])
@pytest.mark.parametrize("density", [0.0, 0.1, 1.0])
def test_encode_decode_round_trip(dtype, code, density):
    from weightflow.dsl.format.dtypes import storage_dtype
    from weightflow.dsl.format.sparse import decode, encode

    x = _storage(_sparse_tensor(1001, density, 0, dtype))
    mask, values = encode(x, code)
    assert len(mask) == (x.size + 7) // 8
    vals = np.frombuffer(values, dtype=storage_dtype(code))
    assert vals.size == int(np.count_nonzero(x))
    assert np.array_equal(decode(mask, vals, x.size), x)
    # pieces of whole mask bytes concatenate to the encoding of the whole
    pieces = [encode(x[a:a + 240], code) for a in range(0, x.size, 240)]
    assert b"".join(m for m, _ in pieces) == mask and b"".join(v for _, v in pieces) == values
    # a range starting mid-byte
    s, e = 13, 777
    before = int(np.count_nonzero(x[:s]))
    k = int(np.count_nonzero(x[s:e]))
    got = decode(mask[s // 8:(e + 7) // 8], vals[before:before + k], e - s, s)
    assert np.array_equal(got, x[s:e])


def test_encode_treats_negative_zero_as_zero():
    from weightflow.dsl.format.sparse import encode

    for t, code in ((torch.tensor([0.0, -0.0, 1.0]), "F32"), (torch.tensor([0.0, -0.0, 1.0]).bfloat16(), BF16)):
        mask, values = encode(_storage(t), code)
        assert mask == bytes([0b100])
        assert len(values) == t.element_size()


def test_decode_refuses_values_that_do_not_fit_the_mask():
    from weightflow.dsl.format.sparse import decode, encode

    x = np.array([0, 1, 0, 2], dtype=np.float32)
    mask, _ = encode(x, "F32")
    with pytest.raises(ValueError):
        decode(mask, np.array([1.0], dtype=np.float32), 4)


def _write_delta(out, tensors: dict[str, torch.Tensor], max_shard_bytes=None, chunk: int = 300):
    from weightflow.dsl.format.checkpoint import TensorInfo
    from weightflow.dsl.format.sparse import DeltaWriter
    from weightflow.ops.lib.tensors import TORCH_TO_ST

    plan = [TensorInfo(n, TORCH_TO_ST[t.dtype], tuple(t.shape)) for n, t in tensors.items()]
    kw = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
    w = DeltaWriter(out, plan, **kw)
    for n, t in tensors.items():
        flat = t.reshape(-1)
        for a in range(0, max(flat.numel(), 1), chunk):
            w.append(n, flat[a:a + chunk])
    return w, w.close()


def test_delta_writer_round_trip_through_checkpoint_and_show(tmp_path):
    from weightflow.dsl.present.tensor_stats import tensor_stats
    from weightflow.ops.lib.tensors import Checkpoint, row_ranges

    tensors = {f"{code}.{d}": _sparse_tensor(60 * 50, d, i, dt).reshape(60, 50)
               for i, (dt, code) in enumerate([(torch.float32, "f32"), (torch.bfloat16, "bf16")])
               for d in (0.0, 0.1, 1.0)}
    w, _ = _write_delta(tmp_path, tensors)
    assert set(w.sparse) == {"f32.0.0", "f32.0.1", "bf16.0.0", "bf16.0.1"}  # dense ones stay dense
    ck = Checkpoint(tmp_path, prefix="delta")
    try:
        for name, t in tensors.items():
            assert ck.is_sparse(name) == (name in w.sparse)
            assert ck.info[name].shape == (60, 50)
            assert torch.equal(ck.get(name), t)
            rows = torch.cat([ck.get(name, lo, hi) for lo, hi in row_ranges(t.shape, max_elements=333)])
            assert torch.equal(rows, t)
            assert torch.equal(ck.get(name, 41, 44), t[41:44])  # a jump back recounts the mask
            assert torch.equal(ck.get(name, 7, 9), t[7:9])
    finally:
        ck.close()
    stats = {r["name"]: r for r in tensor_stats(tmp_path)}
    for name, t in tensors.items():
        r = stats[name]
        assert r["storage"] == ("sparse" if name in w.sparse else "dense")
        assert r["density"] == pytest.approx(float((t != 0).float().mean()))
        assert r["l2"] == pytest.approx(float(t.double().norm()), rel=1e-6)


def test_a_mask_that_disagrees_with_the_values_is_an_error(tmp_path):
    from weightflow.dsl.format.checkpoint import read_header
    from weightflow.dsl.lang.diagnostics import OpError
    from weightflow.ops.lib.tensors import Checkpoint

    t = _sparse_tensor(4000, 0.1, 0, torch.float32)
    _write_delta(tmp_path, {"w": t})
    f = tmp_path / "delta.safetensors"
    header, start = read_header(f)
    a, _ = header["w::mask"]["data_offsets"]
    x = t.numpy()
    zero_byte = next(i for i in range(len(x) // 8) if not x[8 * i:8 * i + 8].any())
    raw = bytearray(f.read_bytes())
    raw[start + a + zero_byte] = 0xFF  # eight more bits than there are values
    f.write_bytes(bytes(raw))
    ck = Checkpoint(tmp_path, prefix="delta")
    with pytest.raises(OpError, match=r"sparse tensor 'w' in delta.safetensors of .*its mask sets \d+ bits"):
        ck.get("w")
    ck.close()


def test_delta_writer_digest_does_not_depend_on_shards(tmp_path):
    from weightflow.dsl.format.checkpoint import artifact_digest, digest_directory

    tensors = {f"t{i}": _sparse_tensor(2000, 0.1 if i % 2 else 1.0, i, torch.float32) for i in range(5)}
    one, d1 = _write_delta(tmp_path / "one", tensors)
    many, d2 = _write_delta(tmp_path / "many", tensors, max_shard_bytes=4000)
    assert len(one.files) == 1 and len(many.files) > 2
    assert artifact_digest(d1, {}) == artifact_digest(d2, {})
    assert digest_directory(tmp_path / "one") == digest_directory(tmp_path / "many")
    index = json.loads((tmp_path / "many" / "delta.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(many.files)
    assert not (tmp_path / "many" / ".spill").exists()


def test_sparse_mask_and_values_share_a_shard_and_read_back(tmp_path):
    """A shard limit that falls between a sparse tensor's mask and its values once split
    them across files, and the stored delta could not be read."""
    from weightflow.ops.lib.tensors import Checkpoint

    tensors = {f"t{i}": _sparse_tensor(60_000, 0.1, i, torch.float32) for i in range(3)}
    _write_delta(tmp_path / "d", tensors, max_shard_bytes=10_000)
    index = json.loads((tmp_path / "d" / "delta.safetensors.index.json").read_text())["weight_map"]
    ck = Checkpoint(tmp_path / "d", prefix="delta")
    try:
        for name in tensors:
            assert index[name + "::mask"] == index[name + "::values"]
            assert torch.equal(ck.get(name), tensors[name])
    finally:
        ck.close()


# --------------------------------------------------------------------------- sharded writer


def _plan(sizes: list[int]):
    from weightflow.dsl.format.checkpoint import TensorInfo

    return [TensorInfo(f"t{i}", "F32", (n,)) for i, n in enumerate(sizes)]


def _write_model(out, sizes: list[int], max_shard_bytes: int, order=None, parts: int = 1):
    from weightflow.dsl.format.checkpoint import ShardedWriter

    plan = _plan(sizes)
    data = {t.name: np.arange(t.shape[0], dtype=np.float32) + 1000 * i for i, t in enumerate(plan)}
    w = ShardedWriter(out, plan, max_shard_bytes=max_shard_bytes)
    for t in (order(plan) if order else plan):
        for piece in np.array_split(data[t.name], parts if t.shape[0] else 1):
            w.append(t.name, piece)
    return w, w.close(), data


def test_sharded_writer_cuts_shards_at_the_byte_limit(tmp_path):
    from safetensors.numpy import load_file

    w, _, data = _write_model(tmp_path, [100, 100, 100, 300], max_shard_bytes=800)  # 400 B each, then 1200 B
    assert w.files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 600 * 4
    assert index["weight_map"] == {"t0": w.files[0], "t1": w.files[0], "t2": w.files[1], "t3": w.files[2]}
    assert list(index["weight_map"]) == sorted(index["weight_map"])
    loaded = {}
    for f in w.files:
        loaded.update(load_file(tmp_path / f))
    assert loaded.keys() == data.keys()
    assert all(np.array_equal(loaded[n], data[n]) for n in data)


def test_sharded_writer_limit_is_inclusive_and_single_shard_has_no_index(tmp_path):
    w, _, _ = _write_model(tmp_path / "a", [100, 100], max_shard_bytes=800)
    assert w.files == ["model.safetensors"] and not (tmp_path / "a" / "model.safetensors.index.json").exists()
    w, _, _ = _write_model(tmp_path / "b", [100, 100], max_shard_bytes=799)
    assert len(w.files) == 2


def test_sharded_writer_digest_does_not_depend_on_shards_or_write_order(tmp_path):
    from weightflow.dsl.format.checkpoint import DEFAULT_SHARD_BYTES, artifact_digest, digest_directory

    sizes = [10, 1000, 3, 250, 0, 77]
    _, d1, _ = _write_model(tmp_path / "one", sizes, DEFAULT_SHARD_BYTES)
    _, d2, _ = _write_model(tmp_path / "many", sizes, 1000, order=lambda p: list(reversed(p)), parts=3)
    assert artifact_digest(d1, {}) == artifact_digest(d2, {})
    assert digest_directory(tmp_path / "one") == digest_directory(tmp_path / "many")
    assert sorted(t.as_list() for t in d1) == sorted(t.as_list() for t in d2)


def test_sharded_writer_refuses_what_the_plan_does_not_say(tmp_path):
    from weightflow.dsl.format.checkpoint import ShardedWriter

    plan = _plan([4, 4])
    with pytest.raises(ValueError, match="duplicate"):
        ShardedWriter(tmp_path / "dup", plan + plan[:1])
    w = ShardedWriter(tmp_path, plan)
    with pytest.raises(KeyError):
        w.write("nope", np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="planned 16"):
        w.write("t0", np.zeros(5, np.float32))
    w.write("t1", np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="written twice"):
        w.write("t1", np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="never written"):
        w.close()


# --------------------------------------------------------------------------- lock file


def _entries(names):
    from weightflow.dsl.store.lockfile import LockEntry

    return {n: LockEntry("load", f"key-{n}", f"digest-{n}") for n in names}


def test_lockfile_round_trip_and_stable_order(tmp_path):
    from weightflow.dsl.store import lockfile

    entries = _entries(["b", "a", "c-1"])
    text = lockfile.render("pipeline.yaml", entries)
    assert text == lockfile.render("pipeline.yaml", dict(reversed(list(entries.items()))))
    assert text.index("a:") < text.index("b:") < text.index("c-1:")
    path = tmp_path / "pipeline.lock"
    assert lockfile.write(path, "pipeline.yaml", entries) is True
    assert path.read_text() == text
    assert lockfile.read(path) == entries
    assert lockfile.read(tmp_path / "missing.lock") == {}


def test_lockfile_unchanged_content_is_not_rewritten(tmp_path):
    from weightflow.dsl.store import lockfile

    path = tmp_path / "pipeline.lock"
    lockfile.write(path, "pipeline.yaml", _entries(["a", "b"]))
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    before = path.stat()
    assert lockfile.write(path, "pipeline.yaml", dict(reversed(list(_entries(["a", "b"]).items())))) is False
    after = path.stat()
    assert (after.st_mtime_ns, after.st_ino) == (before.st_mtime_ns, before.st_ino)
    assert lockfile.write(path, "pipeline.yaml", _entries(["a"])) is True
    assert lockfile.read(path) == _entries(["a"])


@pytest.mark.parametrize("text,what", [
    ("steps: [unclosed\n", "not valid YAML"),
    ("- a\n- b\n", "expected a mapping"),
    ("weightflow: 1\npipeline: p.yaml\n", "no 'steps'"),
    ("weightflow: 2\nsteps: {}\n", "format 2"),
    ("weightflow: 1\nsteps:\n  a: {op: load, key: k}\n", "step 'a' must have string op, key and digest"),
    ("weightflow: 1\nsteps: [a]\n", "'steps' must be a mapping"),
])
def test_lockfile_garbage_is_an_error_not_an_empty_lock(tmp_path, text, what):
    from weightflow.dsl.store import lockfile

    path = tmp_path / "pipeline.lock"
    path.write_text(text)
    with pytest.raises(lockfile.LockfileError, match="pipeline.lock") as exc:
        lockfile.read(path)
    assert what in str(exc.value)
    path.write_bytes(b"\xff\xfe garbage")
    with pytest.raises(lockfile.LockfileError, match="not UTF-8"):
        lockfile.read(path)


# --------------------------------------------------------------------------- dtype table


def test_dtype_table_agrees_with_numpy_and_torch():
    from weightflow.dsl.format import dtypes
    from weightflow.ops.lib import tensors

    for d in dtypes.TABLE:
        assert np.dtype(d.storage).itemsize == d.itemsize
        if d.numpy is not None:
            assert np.dtype(d.numpy).itemsize == d.itemsize
        if d.torch is not None:
            assert torch.empty((), dtype=tensors.ST_TO_TORCH[d.code]).element_size() == d.itemsize
            assert tensors.ST_TO_TORCH[d.code].is_floating_point == d.floating
    assert dict(tensors.TORCH_DTYPES) == {"float32": torch.float32, "float16": torch.float16,
                                          "bfloat16": torch.bfloat16}
    assert {n: tensors.st_dtype_of(n) for n in dtypes.OUTPUT_DTYPES} == \
        {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
    assert set(tensors.FLOAT_ST) == {"F64", "F32", "F16", "BF16"}
    assert dtypes.as_float(torch.tensor([1.5, -2.0]).bfloat16().view(torch.int16).numpy().tobytes(),
                           "BF16").tolist() == [1.5, -2.0]


def test_quiet_transformers_restores_the_previous_settings():
    from transformers.utils import logging as hf_logging

    from weightflow.ops.lib.models import quiet_transformers

    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_info()
    hf_logging.enable_progress_bar()
    try:
        with pytest.raises(RuntimeError), quiet_transformers():
            assert hf_logging.get_verbosity() == hf_logging.ERROR
            assert not hf_logging.is_progress_bar_enabled()
            raise RuntimeError
        assert hf_logging.get_verbosity() == hf_logging.INFO
        assert hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.set_verbosity(before)
