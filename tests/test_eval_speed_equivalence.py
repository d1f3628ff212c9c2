"""The fast scoring paths give the numbers of the straightforward ones.

- ``score_window_groups`` (multiple choice: each question's context run once, its choices
  continued from the KV cache) against one plain forward per whole sequence, and against
  ``score_windows`` (what it replaced), on random windows of a tiny Llama: shared
  prefixes of every length, one-token continuations, truncation, batch sizes 1..5.
- ``shared_prefix`` against its definition.
- Wanda's calibration (the block's last linear skipped on the statistics pass, shared
  inputs summed once) against a straightforward reimplementation: masks and weights
  bit-identical.
"""

from __future__ import annotations

import random

import pytest
import torch
from conftest import TINY_LLAMA


@pytest.fixture(scope="module")
def llama():
    import transformers

    torch.manual_seed(7)
    cfg = dict(TINY_LLAMA)
    cfg.pop("model_type")
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))
    return model.eval()


def one_by_one(model, x: list[int], y: list[int], n: int) -> float:
    """Σ log p of the last n targets, one unpadded forward of the whole input, float64 sums."""
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([x])).logits[0]
    lp = torch.log_softmax(logits.double(), -1)
    t = len(x)
    return float(sum(lp[p, y[p]] for p in range(t - n, t)))


def mc_groups(seed: int, vocab: int = 256) -> list[list[tuple[list[int], list[int], int]]]:
    """Questions as accuracy.py builds them: context + choice, the input drops the last token."""
    rng = random.Random(seed)
    groups = []
    for q in range(6):
        ctx = [rng.randrange(1, vocab) for _ in range(rng.randint(1, 20))]
        choices = []
        for c in range(rng.randint(2, 5)):
            if c == 1 and q % 3 == 0:  # choices sharing their first token(s)
                cont = choices[0][:1] + [rng.randrange(1, vocab) for _ in range(rng.randint(0, 4))]
            else:
                cont = [rng.randrange(1, vocab) for _ in range(rng.randint(1, 7))]
            choices.append(cont)
        windows = []
        for cont in choices:
            seq = (ctx + cont)[-(24 + 1):]  # truncated from the left past 24 tokens
            windows.append((seq[:-1], seq[1:], len(cont)))
        groups.append(windows)
    return groups


@pytest.mark.parametrize("batch_size", [1, 4])
def test_grouped_scoring_equals_one_forward_per_sequence(llama, batch_size):
    from weightflow.ops.metrics._scoring import score_window_groups, score_windows

    groups = mc_groups(batch_size)
    with torch.inference_mode():
        got = score_window_groups(llama, groups, batch_size, 0, "cpu")
        flat = score_windows(llama, [w for g in groups for w in g], batch_size, 0, "cpu")
    assert [len(g) for g in got] == [len(g) for g in groups]
    want = [[one_by_one(llama, *w) for w in g] for g in groups]
    for g_got, g_want in zip(got, want, strict=True):
        assert g_got == pytest.approx(g_want, rel=1e-5, abs=1e-4)
    assert [v for g in got for v in g] == pytest.approx(flat, rel=1e-5, abs=1e-4)
    # and the choice each question would pick is the same
    assert [max(range(len(g)), key=g.__getitem__) for g in got] == \
        [max(range(len(g)), key=g.__getitem__) for g in want]


def test_grouped_scoring_falls_back_without_a_shared_prefix(llama):
    from weightflow.ops.metrics._scoring import score_window_groups

    groups = [[([5, 6, 7], [6, 7, 8], 2), ([9, 6, 7, 1], [6, 7, 1, 2], 3)]]  # first tokens differ
    with torch.inference_mode():
        got = score_window_groups(llama, groups, 4, 0, "cpu")
    want = [[one_by_one(llama, *w) for w in g] for g in groups]
    assert got[0] == pytest.approx(want[0], rel=1e-5, abs=1e-4)


def test_shared_prefix_definition():
    from weightflow.ops.metrics._scoring import shared_prefix

    rng = random.Random(3)
    for _ in range(300):
        base = [rng.randrange(4) for _ in range(rng.randint(1, 8))]
        group = []
        for _ in range(rng.randint(1, 4)):
            x = base[:rng.randint(0, len(base))] + [rng.randrange(4) for _ in range(rng.randint(0, 4))]
            if not x:
                x = [1]
            n = rng.randint(1, len(x))
            group.append((x, x[1:] + [0], n))
        k = shared_prefix(group)
        # every window starts with the same k tokens, and k reaches no further than each
        # window's first scored position (inclusive) nor past its end
        assert all(x[:k] == group[0][0][:k] for x, _, _ in group)
        assert all(k <= len(x) - n + 1 and k <= len(x) for x, _, n in group)
        # and it is the longest such
        limit = min(min(len(x) - n + 1, len(x)) for x, _, n in group)
        if k < limit:
            assert len({x[k] for x, _, _ in group}) > 1


# -- Wanda: the statistics pass that stops early gives the plain hooks' statistics ----------

def plain_wanda(model, samples, batch_size, sparsity, include=None, exclude=()):
    """The straightforward layer-wise Wanda: forward hooks on every chosen linear, each
    block run whole for its statistics, pruned, run again for the next block's inputs."""
    import fnmatch

    from weightflow.ops.lib import wanda
    from weightflow.ops.lib.models import blocks, linear_modules, weight_rows

    prefix, mods = blocks(model)
    batches = wanda.pad_batches(samples, batch_size, 0, "cpu")
    masks = [None if bool(a.all()) else a.bool() for _, a in batches]
    sums = {}
    with torch.inference_mode():
        inputs = wanda.block_inputs(model, mods[0], batches)
        for i, block in enumerate(mods):
            sel = {f"{prefix}.{i}.{r}": m for r, m in linear_modules(block).items()
                   if (include is None or any(fnmatch.fnmatchcase(f"{prefix}.{i}.{r}", p) for p in include))
                   and not any(fnmatch.fnmatchcase(f"{prefix}.{i}.{r}", p) for p in exclude)}
            sq = {n: torch.zeros(weight_rows(m).shape[1], dtype=torch.float64) for n, m in sel.items()}
            cur = {}

            def hook(_m, inp, _out, name, sq=sq, cur=cur):
                x, tm = inp[0], cur["tm"]
                x = x[tm] if tm is not None and tuple(x.shape[:-1]) == tuple(tm.shape) else x.reshape(-1, x.shape[-1])
                sq[name] += wanda.sum_of_squares(x)

            hs = [m.register_forward_hook(lambda mod, inp, out, n=n: hook(mod, inp, out, n)) for n, m in sel.items()]
            for (args, kwargs), tm in zip(inputs, masks, strict=True):
                cur["tm"] = tm
                block(*args, **kwargs)
            for h in hs:
                h.remove()
            for n, m in sel.items():
                w = weight_rows(m)
                w.masked_fill_(wanda.mask_from_scores(wanda.wanda_scores(w, sq[n]), sparsity, None, "row"), 0)
                sums[n] = sq[n]
            inputs = [wanda._with_hidden(a, k, wanda._first(block(*a, **k))) for a, k in inputs]
    return sums


@pytest.mark.parametrize("exclude", [[], ["*down_proj", "*.1.self_attn.o_proj"]])
def test_wanda_statistics_and_masks_equal_the_plain_hooks(exclude):
    import copy

    import transformers

    from weightflow.ops.lib import wanda

    torch.manual_seed(11)
    cfg = dict(TINY_LLAMA, num_hidden_layers=3)
    cfg.pop("model_type")
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg, use_cache=False)).eval()
    twin = copy.deepcopy(model)
    g = torch.Generator().manual_seed(5)
    samples = [torch.randint(1, 256, (int(n),), generator=g) for n in (12, 12, 7, 12, 9)]  # some padded
    result = wanda.prune(model, method="wanda", sparsity=0.5, nm=None, group="row", include=None,
                         exclude=exclude, samples=samples, batch_size=2, pad=0)
    want = plain_wanda(twin, samples, 2, 0.5, exclude=exclude)
    assert set(result.sumsq) == set(want) and len(want) == 3 * 7 - 3 * bool(exclude) - bool(exclude)
    for name, sq in want.items():
        assert torch.equal(result.sumsq[name], sq), name
    mine, theirs = dict(model.named_parameters()), dict(twin.named_parameters())
    for name, p in theirs.items():
        assert torch.equal(mine[name], p), name
