"""prune-wanda: masks equal an independent whole-model reference; N:M; magnitude by hand.

The reference here is written plainly and separately from ops/wanda.py: for each
transformer block in turn it runs the *whole model* on every calibration batch with
forward hooks on that block's linears, accumulates Σx² per input feature (padding left
out), scores |W|·‖X‖₂, sorts each row in Python by (score, position), zeroes the
lowest, and only then moves on to the next block.  No block-wise shortcuts.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import read_model, run, save_tiny_llama, write_pipeline

TINY_GPT2 = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 256,
             "n_positions": 128}
TINY_BERT = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "intermediate_size": 128, "vocab_size": 256, "max_position_embeddings": 128, "num_labels": 2}


# -- tiny models and data ---------------------------------------------------------------

def save_tiny_gpt2(path, seed=0):
    import transformers

    cfg = dict(TINY_GPT2)
    cfg.pop("model_type")
    torch.manual_seed(seed)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg)).save_pretrained(path)
    return path


def save_tiny_bert(path, seed=0):
    import transformers

    torch.manual_seed(seed)
    transformers.BertForSequenceClassification(transformers.BertConfig(**TINY_BERT)).save_pretrained(path)
    return path


def calib_file(path, n=8, length=32, seed=0, varying=False, vocab=256):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        L = length - (i * 3) % 11 if varying else length
        rows.append({"input_ids": torch.randint(3, vocab, (L,), generator=g).tolist()})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def samples_of(path):
    return [torch.tensor(json.loads(line)["input_ids"]) for line in path.read_text().splitlines()]


# -- the independent reference -------------------------------------------------------------

def reference_blocks(model):
    for attr in ("model.layers", "transformer.h", "bert.encoder.layer"):
        obj = model
        try:
            for part in attr.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        return attr, obj
    raise AssertionError("unknown architecture")


def rows_of(mod):
    return mod.weight.data if isinstance(mod, torch.nn.Linear) else mod.weight.data.t()


def reference_masks(model, samples, sparsity, nm=None, batch_size=4, pad=0):  # noqa: C901
    """{module name: bool mask [out, in]} by whole-model Wanda, block after block."""
    from transformers.pytorch_utils import Conv1D

    batches = []
    for lo in range(0, len(samples), batch_size):
        chunk = samples[lo:lo + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad)
        attn = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, s in enumerate(chunk):
            ids[i, :len(s)] = s
            attn[i, :len(s)] = 1
        batches.append((ids, attn))
    prefix, blocks = reference_blocks(model)
    masks = {}
    for b, block in enumerate(blocks):
        linears = {f"{prefix}.{b}.{n}": m for n, m in block.named_modules()
                   if isinstance(m, (torch.nn.Linear, Conv1D))}
        sumsq = {n: torch.zeros(rows_of(m).shape[1], dtype=torch.float64) for n, m in linears.items()}
        current = {}

        def make_hook(name, current=current, sumsq=sumsq):
            def hook(_m, inp, _o):
                x = inp[0][current["attn"].bool()]  # real tokens only
                sumsq[name] += (x.double() ** 2).sum(0)
            return hook

        handles = [m.register_forward_hook(make_hook(n)) for n, m in linears.items()]
        with torch.no_grad():
            for ids, attn in batches:
                current["attn"] = attn
                model(input_ids=ids, attention_mask=attn)
        for h in handles:
            h.remove()
        for name, mod in linears.items():
            w = rows_of(mod)
            score = (w.double().abs() * sumsq[name].sqrt()).tolist()
            out_f, in_f = w.shape
            mask = torch.zeros(out_f, in_f, dtype=torch.bool)
            for r in range(out_f):
                if nm is None:
                    order = sorted(range(in_f), key=lambda j: (score[r][j], j))
                    for j in order[: int(math.floor(in_f * sparsity + 1e-9))]:
                        mask[r, j] = True
                else:
                    n, m = nm
                    for g0 in range(0, in_f, m):
                        order = sorted(range(g0, g0 + m), key=lambda j: (score[r][j], j))
                        for j in order[: m - n]:
                            mask[r, j] = True
            with torch.no_grad():
                w[mask] = 0
            masks[name] = mask
    return masks


def load_hf(path):
    import transformers

    arch = json.loads((path / "config.json").read_text())["architectures"][0]
    model = getattr(transformers, arch).from_pretrained(path, dtype=torch.float32)
    model.eval()
    model.config.use_cache = False
    return model


def pruned_masks(out_dir, names):
    tensors = read_model(out_dir)
    out = {}
    for name in names:
        w = tensors[name + ".weight"]
        out[name] = (w == 0) if "transformer.h" not in name else (w == 0).t()
    return out


def prune_pipeline(tmp_path, src, calib, extra, name="p.yaml"):
    return write_pipeline(tmp_path, f"""
weightflow: 1
steps:
  base: {{op: load, source: {src}}}
  pruned:
    op: prune-wanda
    model: base
    calibration: {{data: {calib}, samples: 8, seq_len: 32}}
    batch_size: 4
    {extra}
outputs: {{pruned: out/pruned}}
""", name)


# -- tests ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("prune_models")
    return {"llama": save_tiny_llama(root / "llama", seed=11), "gpt2": save_tiny_gpt2(root / "gpt2", seed=12),
            "bert": save_tiny_bert(root / "bert", seed=13)}


CASES = [("llama", "sparsity: 0.5", None, False), ("llama", 'pattern: "2:4"', (2, 4), False),
         ("gpt2", "sparsity: 0.5", None, False), ("gpt2", 'pattern: "2:4"', (2, 4), False),
         ("llama", "sparsity: 0.3", None, True), ("bert", "sparsity: 0.5", None, True),
         ("gpt2", 'pattern: "4:8"', (4, 8), True)]


@pytest.mark.parametrize("arch,extra,nm,varying", CASES,
                         ids=[f"{a}-{e.split(': ')[1].strip(chr(34))}{'-padded' if v else ''}"
                              for a, e, _, v in CASES])
def test_wanda_masks_equal_whole_model_reference(tmp_path, store_dir, tiny_dirs, arch, extra, nm, varying):
    calib = calib_file(tmp_path / "calib.jsonl", varying=varying)
    path = prune_pipeline(tmp_path, tiny_dirs[arch], calib, extra)
    outcome, status = run(path, store_dir)
    assert status == {"base": "executed", "pruned": "executed"}
    sparsity = 0.5 if nm else float(extra.split(": ")[1])
    ref = reference_masks(load_hf(tiny_dirs[arch]), samples_of(calib), sparsity, nm)
    got = pruned_masks(tmp_path / "out" / "pruned", ref)
    assert set(ref) == set(got) and len(ref) >= 8
    for name in ref:
        assert torch.equal(got[name], ref[name]), f"{name}: {(got[name] != ref[name]).sum()} mask entries differ"
        rows = got[name].sum(1)
        if nm is None:  # exact per row
            assert torch.all(rows == math.floor(got[name].shape[1] * sparsity + 1e-9)), name
        else:  # every group of M keeps exactly N
            n, m = nm
            groups = (~got[name]).reshape(got[name].shape[0], -1, m).sum(-1)
            assert torch.all(groups == n), name
    meta = json.loads((tmp_path / "out" / "pruned" / "weightflow.json").read_text())
    assert meta["sparsity"] == pytest.approx(sparsity, abs=0.02)
    assert set(meta["per_block"]) == {"0", "1"}
    assert all(v["zeros"] >= v["numel"] * (sparsity - 0.02) for v in meta["layers"].values())
    # nothing outside the blocks changed: embeddings, lm_head, norms
    before, after = read_model(tiny_dirs[arch]), read_model(tmp_path / "out" / "pruned")
    for name, t in before.items():
        if not any(name.startswith(n) for n in ref):
            assert torch.equal(t, after[name]), name


def test_magnitude_equals_hand_computation(tmp_path, store_dir, tiny_dirs):
    path = write_pipeline(tmp_path, f"""
weightflow: 1
steps:
  base: {{op: load, source: {tiny_dirs["llama"]}}}
  layer: {{op: prune-wanda, model: base, method: magnitude, sparsity: 0.4}}
  row: {{op: prune-wanda, model: base, method: magnitude, sparsity: 0.4, group: row,
         exclude: ["*self_attn*"]}}
  nm: {{op: prune-wanda, model: base, method: magnitude, pattern: "2:4", include: ["*.mlp.*"]}}
outputs: {{layer: out/layer, row: out/row, nm: out/nm}}
""")
    run(path, store_dir)
    base = read_model(tiny_dirs["llama"])
    outs = {k: read_model(tmp_path / "out" / k) for k in ("layer", "row", "nm")}
    for name, w in base.items():
        in_block = name.startswith("model.layers.") and w.dim() == 2
        # layer: the floor(0.4 n) smallest |w| of the whole matrix, ties by position
        if in_block:
            flat = w.abs().flatten().tolist()
            k = int(math.floor(len(flat) * 0.4 + 1e-9))
            drop = sorted(range(len(flat)), key=lambda j: (flat[j], j))[:k]
            want = w.flatten().clone()
            want[drop] = 0
            assert torch.equal(outs["layer"][name], want.reshape(w.shape)), name
        else:
            assert torch.equal(outs["layer"][name], w), name
        # row, attention excluded
        if in_block and "self_attn" not in name:
            want = w.clone()
            for r in range(w.shape[0]):
                row = w[r].abs().tolist()
                for j in sorted(range(len(row)), key=lambda j: (row[j], j))[: int(len(row) * 0.4)]:
                    want[r, j] = 0
            assert torch.equal(outs["row"][name], want), name
            assert torch.all((outs["row"][name] == 0).sum(1) == int(w.shape[1] * 0.4))
        else:
            assert torch.equal(outs["row"][name], w), name
        # 2:4 on the MLP only: the two largest |w| of every 4 survive
        if in_block and ".mlp." in name:
            g = w.reshape(w.shape[0], -1, 4)
            keep = g.abs().argsort(dim=-1, descending=True, stable=True)[..., :2]
            want = torch.zeros_like(g).scatter_(-1, keep, g.gather(-1, keep)).reshape(w.shape)
            assert torch.equal(outs["nm"][name], want), name
        else:
            assert torch.equal(outs["nm"][name], w), name


def test_params_are_checked_before_running(tmp_path, tiny_dirs):
    from weightflow.dsl.lang.diagnostics import PipelineError
    from weightflow.dsl.lang.pipeline import load_pipeline

    calib = calib_file(tmp_path / "c.jsonl")
    bad = {
        "sparsity: 1.0": "less than 1",
        "exclude: []": "needs 'sparsity'",
        'pattern: "2:4"\n    sparsity: 0.7': "contradicts",
        'pattern: "4:2"': "N must be smaller",
        'pattern: "2-4"': "pattern",
        "sparsity: 0.5\n    method: magnitude": "uses no calibration",
    }
    for i, (extra, msg) in enumerate(bad.items()):
        path = prune_pipeline(tmp_path, tiny_dirs["llama"], calib, extra, name=f"bad{i}.yaml")
        with pytest.raises(PipelineError) as exc:
            load_pipeline(path)
        text = "\n".join(exc.value.lines())
        assert msg in text and f"bad{i}.yaml:" in text and "step 'pruned'" in text, text
    path = write_pipeline(tmp_path, f"""
weightflow: 1
steps:
  base: {{op: load, source: {tiny_dirs["llama"]}}}
  p: {{op: prune-wanda, model: base, sparsity: 0.5}}
""", "nocal.yaml")
    with pytest.raises(PipelineError, match="needs 'calibration'"):
        load_pipeline(path)


def test_include_matching_nothing_is_a_clear_error(tmp_path, store_dir, tiny_dirs):
    calib = calib_file(tmp_path / "c.jsonl")
    path = prune_pipeline(tmp_path, tiny_dirs["llama"], calib, 'sparsity: 0.5\n    include: ["lm_head"]')
    from weightflow.dsl.lang.diagnostics import StepFailed

    with pytest.raises(StepFailed, match="matches no linear layer inside the transformer blocks"):
        run(path, store_dir)


def test_batching_does_not_change_the_statistics(tiny_dirs):
    """Padding-aware: padded batches give the same input norms as one sample at a time."""
    from weightflow.ops.lib import models, wanda

    g = torch.Generator().manual_seed(5)
    samples = [torch.randint(3, 256, (n,), generator=g) for n in (30, 17, 25, 9, 32, 12)]
    stats = []
    for bs in (1, 4, 6):
        model = models.load_model(tiny_dirs["llama"])
        res = wanda.prune(model, method="wanda", sparsity=0.5, nm=None, group="row", include=None,
                           exclude=[], samples=samples, batch_size=bs, pad=0)
        stats.append(res.sumsq)
    assert len(stats[0]) == 14
    for other in stats[1:]:
        for k in stats[0]:
            torch.testing.assert_close(other[k], stats[0][k], rtol=1e-5, atol=1e-8)


def test_lowest_k_breaks_ties_by_position():
    from weightflow.ops.lib.wanda import lowest

    g = torch.Generator().manual_seed(0)
    score = torch.randint(0, 4, (50, 16), generator=g).double()  # many ties
    for k in (0, 1, 5, 8, 15, 16):
        got = lowest(score, k)
        for r in range(score.shape[0]):
            order = sorted(range(16), key=lambda j: (score[r, j].item(), j))[:k]
            want = torch.zeros(16, dtype=torch.bool)
            want[order] = True
            assert torch.equal(got[r], want), (k, r)
