"""quantize-delta: int8 / int4 deltas with per-channel or group-wise scales, stored
compactly, dequantized on read, composable with DARE's bitmask (issue 15).

Expected values are quantized by hand here, in torch, from the formulas in
``weightflow.dsl.format.quantized``'s docstring (not with its code)."""

from __future__ import annotations

import json
import struct

import pytest
from conftest import read_model, run, write_pipeline

PIPE = """
weightflow: 1
name: quant
steps:
  base: {{op: load, source: {base}}}
  ft: {{op: load, source: {ft_a}}}
  d: {{op: extract-delta, model: ft, base: base}}
  q8: {{op: quantize-delta, delta: d, bits: 8}}
  q4: {{op: quantize-delta, delta: d, bits: 4, group_size: 32}}
  q4a: {{op: quantize-delta, delta: d, bits: 4, group_size: 16, symmetric: false, scale_dtype: float32}}
  dare: {{op: dare-prune, delta: d, drop_rate: 0.9, exclude: ["*norm*"]}}
  dq: {{op: quantize-delta, delta: dare, bits: 4}}
  merged: {{op: merge, method: task-arithmetic, base: base, deltas: [q4], lambda: 0.7}}
  merged_dq: {{op: merge, method: task-arithmetic, base: base, deltas: [dq]}}
"""


@pytest.fixture(scope="module")
def project(tiny_models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quant")
    path = write_pipeline(tmp, PIPE.format(**{k: str(v) for k, v in tiny_models.items()}))
    outcome, status = run(path, tmp / "cache")
    assert set(status.values()) == {"executed"}, status
    from weightflow.dsl.store.content import Store

    store = Store(tmp / "cache")
    return tmp, path, {s.name: store.lookup(s.key) for s in outcome.steps}


def by_hand(x, bits: int, groups, symmetric: bool = True, scale_dtype=None):
    """Quantize-dequantize the float32 values ``x`` (1-D) grouped by ``groups`` (a list of
    index tensors), as the formulas say."""
    import torch

    scale_dtype = scale_dtype or torch.float16
    out = torch.zeros_like(x)
    n = 2 ** bits
    for idx in groups:
        v = x[idx].double()
        if v.numel() == 0:
            continue
        if symmetric:
            s = (v.abs().max() / (n // 2 - 1)).to(scale_dtype).double()
            q = torch.round(v / s).clamp(-(n // 2 - 1), n // 2 - 1) if s > 0 else torch.zeros_like(v)
            z = n // 2
            u = q + z
        else:
            lo, hi = min(float(v.min()), 0.0), max(float(v.max()), 0.0)
            s = torch.tensor((hi - lo) / (n - 1), dtype=torch.float64).to(scale_dtype).double()
            z = float(torch.round(-lo / s).clamp(0, n - 1)) if s > 0 else 0.0
            u = (torch.round(v / s) + z).clamp(0, n - 1) if s > 0 else torch.full_like(v, z)
        out[idx] = (u.float() - torch.tensor(z, dtype=torch.float32)) * s.float()
    return out


def _rows(t):
    import torch

    flat = torch.arange(t.numel())
    return list(flat.reshape(t.shape[0], -1)) if t.dim() >= 2 else [flat]


def _runs(count: int, g: int):
    import torch

    return list(torch.arange(count).split(g))


def test_int8_per_channel_equals_a_quantization_by_hand(project):
    import torch

    _, _, e = project
    delta, q8 = read_model(e["d"].path), read_model(e["q8"].path)
    assert set(q8) == set(delta)
    for n, x in delta.items():
        want = by_hand(x.reshape(-1), 8, _rows(x)).reshape(x.shape)
        assert torch.equal(q8[n], want), n
        assert not torch.equal(q8[n], x)
    info = e["q8"].manifest["info"]["tensors"]
    for n, x in delta.items():
        err = (q8[n].double() - x.double())
        assert info[n]["max_error"] == pytest.approx(float(err.abs().max()), rel=1e-9)
        assert info[n]["relative_error"] == pytest.approx(float(err.norm() / x.double().norm()), rel=1e-9)
        assert info[n]["relative_error"] < 0.01  # int8 per channel of Gaussian noise: ~0.4%


@pytest.mark.parametrize(("step", "g", "symmetric", "sdtype"), [("q4", 32, True, "float16"),
                                                                 ("q4a", 16, False, "float32")])
def test_int4_groupwise_equals_a_quantization_by_hand(project, step, g, symmetric, sdtype):
    import torch

    _, _, e = project
    delta, q = read_model(e["d"].path), read_model(e[step].path)
    for n, x in delta.items():
        want = by_hand(x.reshape(-1), 4, _runs(x.numel(), g), symmetric, getattr(torch, sdtype))
        assert torch.equal(q[n].reshape(-1), want), n


def _stored(entry) -> dict:
    """{stored tensor name: (dtype, shape, byte length)} and the file's metadata."""
    [f] = entry.path.glob("delta*.safetensors")
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__")
    return {k: (v["dtype"], v["shape"], v["data_offsets"][1] - v["data_offsets"][0])
            for k, v in header.items()}, meta, len(raw) - 8 - n


def test_bytes_on_disk_are_the_codes_and_scales(project):
    import math

    _, _, e = project
    delta = read_model(e["d"].path)
    stored, meta, data_bytes = _stored(e["q4"])
    expected = sum((t.numel() + 1) // 2 + 2 * math.ceil(t.numel() / 32) for t in delta.values())
    assert data_bytes == expected
    full = sum(4 * t.numel() for t in delta.values())
    assert full / data_bytes > 7  # 4 bits + a float16 scale per 32 values: 7.1x smaller than float32
    specs = json.loads(meta["weightflow.quantized"])
    for n, t in delta.items():
        assert stored[f"{n}::codes"] == ("U8", [(t.numel() + 1) // 2], (t.numel() + 1) // 2)
        assert specs[n]["bits"] == 4 and specs[n]["group_size"] == 32 and not specs[n]["masked"]


def test_int4_packing_round_trips_two_codes_a_byte():
    import numpy as np

    from weightflow.dsl.format.quantized import pack, unpack

    assert pack(np.array([1, 2, 15], np.uint8), 4).tolist() == [0x21, 0x0F]  # low nibble first
    rng = np.random.default_rng(0)
    for count in (1, 2, 7, 64, 101):
        codes = rng.integers(0, 16, count).astype(np.uint8)
        packed = pack(codes, 4)
        assert packed.size == (count + 1) // 2
        for first in range(min(count, 5)):
            k = count - first
            assert unpack(packed[first // 2:].tobytes(), 4, first, k).tolist() == codes[first:].tolist()
        assert unpack(pack(codes, 8).tobytes(), 8, 0, count).tolist() == codes.tolist()


def test_a_dare_pruned_delta_keeps_its_mask_and_codes_only_the_kept_values(project):
    import math

    import torch

    _, _, e = project
    dare, dq = read_model(e["dare"].path), read_model(e["dq"].path)
    stored, meta, data_bytes = _stored(e["dq"])
    specs = json.loads(meta["weightflow.quantized"])
    expected = 0
    for n, x in dare.items():
        kept = x.reshape(-1) != 0
        assert torch.equal(dq[n].reshape(-1) != 0, kept & (dq[n].reshape(-1) != 0))
        assert torch.all(dq[n].reshape(-1)[~kept] == 0)
        rows = [idx[kept[idx]] for idx in _rows(x)]  # each row's kept values share a scale
        want = by_hand(x.reshape(-1), 4, rows)
        assert torch.equal(dq[n].reshape(-1), want), n
        nnz = int(kept.sum())
        if "norm" in n:  # not pruned: every element is coded, no mask
            assert not specs[n]["masked"] and f"{n}::qmask" not in stored
            expected += (x.numel() + 1) // 2 + 2 * (x.shape[0] if x.dim() >= 2 else 1)
        else:
            assert specs[n]["masked"] and specs[n]["count"] == nnz
            assert stored[f"{n}::qmask"][2] == math.ceil(x.numel() / 8)
            expected += math.ceil(x.numel() / 8) + (nnz + 1) // 2 + 2 * x.shape[0]
    assert data_bytes == expected
    # 1/8 (mask) + 0.1/2 (codes) + 2/64 (a float16 scale per 64-wide row) bytes per element
    assert sum(4 * t.numel() for t in dare.values()) / data_bytes > 18


def test_merge_of_a_quantized_delta_is_the_merge_of_its_dequantized_values(project):
    import torch

    _, _, e = project
    base = read_model(e["base"].path)
    for step, delta_step, lam in (("merged", "q4", 0.7), ("merged_dq", "dq", 1.0)):
        merged, deq = read_model(e[step].path), read_model(e[delta_step].path)
        for n, w in base.items():
            want = (w.double() + lam * deq[n].double()).float() if n in deq else w
            torch.testing.assert_close(merged[n], want, rtol=0, atol=1e-7)


def test_export_dense_writes_the_dequantized_float_values(project, tmp_path, cli):
    import torch
    from safetensors import safe_open

    tmp, path, e = project
    for step in ("q4", "dq"):
        target = tmp_path / step
        rc, _, err = cli("export", path, step, target, "--cache-dir", tmp / "cache")
        assert rc == 0, err
        want = read_model(e[step].path)
        got = {}
        for f in target.glob("*.safetensors"):
            with safe_open(str(f), framework="pt") as fh:
                assert "weightflow.quantized" not in (fh.metadata() or {})
                got.update({k: fh.get_tensor(k) for k in fh.keys()})  # noqa: SIM118
        assert set(got) == set(want)
        assert all(got[n].dtype == torch.float32 and torch.equal(got[n], want[n]) for n in want)


def test_row_range_reads_equal_the_whole_tensor(tmp_path):
    """Masked and group-wise tensors read in row chunks, in order and jumping back."""
    import torch

    from weightflow.dsl.format.checkpoint import TensorInfo
    from weightflow.dsl.format.quantized import QUANT_META, quantize
    from weightflow.dsl.format.sparse import DeltaWriter
    from weightflow.ops.lib.tensors import Checkpoint

    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 29, generator=g)
    x[torch.rand(37, 29, generator=g) < 0.85] = 0
    cases = {"masked_rows": (4, None, True), "masked_runs": (8, 10, False), "dense_runs": (4, 7, True)}
    w = DeltaWriter(tmp_path, [TensorInfo(n, "F32", (37, 29)) for n in cases])
    for n, (bits, gs, sym) in cases.items():
        q = quantize(n, x.reshape(-1).numpy(), (37, 29), bits, gs, sym, masked=not n.startswith("dense"))
        w.append_encoded(n, q.parts, QUANT_META, q.spec)
    w.close()
    ck = Checkpoint(tmp_path, prefix="delta")
    for n in cases:
        whole = ck.get(n)
        assert (whole == 0).sum() >= (x == 0).sum()
        for lo, hi in [(0, 5), (5, 6), (6, 37), (20, 30), (3, 4), (36, 37), (0, 37)]:
            assert torch.equal(ck.get(n, lo, hi), whole[lo:hi]), (n, lo, hi)


def test_a_corrupted_header_is_a_clear_error(project, tmp_path):
    import shutil

    from weightflow.dsl.lang.diagnostics import OpError
    from weightflow.ops.lib.tensors import Checkpoint

    _, _, e = project
    copy = tmp_path / "broken"
    shutil.copytree(e["q4"].path, copy)
    [f] = copy.glob("delta*.safetensors")
    raw = f.read_bytes()
    raw = raw.replace(b'\\"bits\\":4', b'\\"bits\\":3', 1)
    f.write_bytes(raw)
    with pytest.raises(OpError, match="quantized tensor .*'bits' is 3"):
        Checkpoint(copy, prefix="delta")


@pytest.mark.parametrize(("params", "message"), [
    ({"bits": 3}, "Input should be 8 or 4"),
    ({"group_size": 0}, "greater than or equal to 1"),
    ({"scale_dtype": "bfloat16"}, "'float16' or 'float32'"),
])
def test_bad_params_are_clear_errors(params, message):
    from pydantic import ValidationError

    from weightflow.ops.quantize_delta import QuantizeDeltaParams

    with pytest.raises(ValidationError, match=message):
        QuantizeDeltaParams(delta="d", **params)


def test_show_lists_the_quantized_tensors_with_their_encoding(project):
    from weightflow.dsl.present.tensor_stats import summarize

    _, _, e = project
    for step, storage in (("q4", "int4 g32"), ("q4a", "int4 g16 asym"), ("q8", "int8 row")):
        summary = summarize(e[step].path, "Delta")
        dense = read_model(e[step].path)
        rows = {r["name"]: r for r in summary["per_tensor"]}
        assert set(rows) == set(dense)
        assert summary["stored_bytes"] == _stored(e[step])[2]
        for n, t in dense.items():
            assert rows[n]["storage"] == storage
            assert rows[n]["l2"] == pytest.approx(float(t.double().norm()), rel=1e-6)
    rows = {r["name"]: r for r in summarize(e["dq"].path, "Delta")["per_tensor"]}
    assert {r["storage"] for n, r in rows.items() if "norm" not in n} == {"int4 row+mask"}


@pytest.mark.parametrize(("group_size", "symmetric", "masked"), [(None, True, True), (None, False, False),
                                                                 (6, True, True), (5, False, False)])
def test_quantizing_in_slices_gives_the_same_bytes(monkeypatch, group_size, symmetric, masked):
    """Big tensors are quantized a few million values at a time; cut into tiny slices here."""
    import numpy as np

    from weightflow.dsl.format import quantized

    rng = np.random.default_rng(1)
    x = rng.standard_normal(23 * 17).astype(np.float32)
    x[rng.random(x.size) < 0.6] = 0
    whole = quantized.quantize("w", x, (23, 17), 4, group_size, symmetric, masked=masked)
    for step in (5, 13, 40):  # one group a slice, and several
        monkeypatch.setattr(quantized, "_SLICE", step)
        sliced = quantized.quantize("w", x, (23, 17), 4, group_size, symmetric, masked=masked)
        assert sliced.parts == whole.parts and sliced.spec == whole.spec
        assert sliced.max_error == whole.max_error
        assert sliced.sq_error == pytest.approx(whole.sq_error, rel=1e-12)
