"""prune-wanda's masks against llm-compressor's ``WandaPruningModifier`` (same model, same ids).

Runs only where llm-compressor is installed (it cannot be in the project's environment:
its releases need an older transformers); ``tests/benchmarks/llmcompressor_venv.sh``
builds a separate venv where it is, and there::

    /work/llmc-venv/bin/python -m pytest tests/test_vs_llmcompressor.py -q

Both tools do the same thing (read from llmcompressor 0.14.0.1's
``modifiers/pruning/wanda`` and ``pipelines/sequential``): block by block, hooks on
every linear of the block collect the squared L2 norm of each input feature over the
calibration tokens, every linear of the block is pruned by |W|·‖X‖₂, and the *pruned*
block is run again to feed the next one (``propagate_error=True``).  Unstructured
pruning removes ``floor(s·n)`` weights per output row, ties by position (a stable
sort in both); ``N:M`` with N = M/2 keeps / prunes the same N of every M.  What
differs, none of it on a ranking here:

- llm-compressor keeps the statistic as a float32 running *mean* over samples
  (Σx² / number of sequences); weightflow keeps Σx² in float64.  The factor is the
  same for every feature of a layer, so the ranking within a row is the same up to
  float32 rounding: only scores equal to ~1e-6 relative could order differently.
- llm-compressor counts padding tokens; weightflow leaves them out.  The samples here
  are all of one length, so there is no padding.
- llm-compressor's ``N:M`` prunes N of every M (``mask_structure: "2:4"`` prunes 2)
  and breaks ties with ``topk`` (unspecified order); weightflow's keeps N.  Only
  N = M/2 means the same thing in both, so only 2:4 is compared.
- llm-compressor calibrates with eager attention (it forces it for its traced
  subgraphs); weightflow runs the model's default (sdpa).  The two round differently
  in float32 (~1e-7 relative), which again can only reorder near-equal scores.
- ``targets`` is the decoder-block class, so llm-compressor prunes the linears inside
  the blocks, as weightflow does; its default (``Linear``) would also prune lm_head
  (and with it tied embeddings), and the old ``"__ALL__"`` matches nothing (nothing
  would be pruned).
- llm-compressor 0.14.0.1 prunes no layer of a GPT-2, so only Llama is compared: it
  picks the modules to prune by class name from ``PRUNABLE_LAYER_TYPES = ["Linear",
  "Conv1d", "Conv2d", "Conv3d"]``, matched exactly, and transformers' GPT-2 layers are
  ``Conv1D``; adding "Conv1D" to that list makes it fail (``make_empty_row_scalars``
  sizes the statistic by ``weight.shape[1]``, the *output* size of a Conv1D).

The bar is therefore exact equality of every mask.  The rounding differences above
can flip two scores of a row only when they agree to ~1e-6 relative; on these tiny
models (rows of 64 and 128, fixed seeds, pinned torch) there is no such pair, so any
difference is a real divergence.  On SmolLM2-135M there are such pairs, and a flip in
one block changes the inputs of the next: ``tests/benchmarks/bench_wanda.py`` measures
99.86% identical positions there, and exactly 100% once llm-compressor's statistics are
float64 and weightflow's model runs eager attention.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import read_model, run, save_tiny_llama, write_pipeline

llmc = pytest.importorskip("llmcompressor")

SAMPLES, SEQ_LEN, BATCH = 8, 32, 4


def calibration(path, seed=0, vocab=256):
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(3, vocab, (SEQ_LEN,), generator=g).tolist() for _ in range(SAMPLES)]
    path.write_text("".join(json.dumps({"input_ids": r}) + "\n" for r in rows))
    return [torch.tensor(r) for r in rows]


def placeholder_processor():
    """oneshot insists on a processor when given data; with a DataLoader it never uses it."""
    import tokenizers
    import transformers

    model = tokenizers.models.WordLevel({"<unk>": 0}, unk_token="<unk>")
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizers.Tokenizer(model))


def llmcompressor_prune(model_dir, samples, sparsity, mask_structure):
    """The model after oneshot(WandaPruningModifier), fed exactly weightflow's batches."""
    import transformers
    from llmcompressor.modifiers.pruning import WandaPruningModifier
    from torch.utils.data import DataLoader

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    batches = [{"input_ids": torch.stack(samples[i:i + BATCH]),
                "attention_mask": torch.ones(len(samples[i:i + BATCH]), SEQ_LEN, dtype=torch.long)}
               for i in range(0, len(samples), BATCH)]
    llmc.oneshot(model=model, dataset=DataLoader(batches, batch_size=None), processor=placeholder_processor(),
                 recipe=WandaPruningModifier(sparsity=sparsity, mask_structure=mask_structure,
                                             targets=["LlamaDecoderLayer"]))
    return {n: p.detach() for n, p in model.named_parameters()}


CASES = {  # id: (weightflow's prune-wanda params, llm-compressor's sparsity and mask_structure)
    "0.5": ("sparsity: 0.5", 0.5, "0:0"),
    "0.3": ("sparsity: 0.3", 0.3, "0:0"),
    "2:4": ('pattern: "2:4"', 0.5, "2:4"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_masks_equal_llmcompressor_wanda(tmp_path, store_dir, case):
    params, sparsity, structure = CASES[case]
    src = save_tiny_llama(tmp_path / "model", seed=21)
    samples = calibration(tmp_path / "calib.jsonl")
    path = write_pipeline(tmp_path, f"""
        weightflow: 1
        steps:
          base: {{op: load, source: {src}}}
          pruned:
            op: prune-wanda
            model: base
            {params}
            calibration: {{data: calib.jsonl, samples: {SAMPLES}, seq_len: {SEQ_LEN}}}
            batch_size: {BATCH}
        outputs: {{pruned: out/pruned}}
        """)
    _, status = run(path, store_dir)
    assert status["pruned"] == "executed"
    ours = read_model(tmp_path / "out" / "pruned")
    theirs = llmcompressor_prune(src, samples, sparsity, structure)
    pruned = [n for n, w in theirs.items() if n.startswith("model.layers.") and w.dim() == 2]
    # the same set of layers: every 2-D weight inside the blocks, nothing outside them
    assert len(pruned) == 7 * 2
    dense = read_model(src)
    for name, w in theirs.items():  # everything else (lm_head, embeddings, norms) left as it was
        if name not in pruned:
            torch.testing.assert_close(ours[name], w, rtol=0, atol=0, msg=name)
            torch.testing.assert_close(w, dense[name], rtol=0, atol=0, msg=name)
    differing = {}
    for name in pruned:
        mine, other = ours[name] == 0, theirs[name] == 0
        assert 0.29 < float(other.float().mean()) <= 0.5, name  # llm-compressor did prune it
        if not torch.equal(mine, other):
            differing[name] = int((mine != other).sum())
    assert not differing, f"positions that differ per layer: {differing}"
    # and the surviving weights are untouched in both
    for name in pruned:
        keep = ours[name] != 0
        torch.testing.assert_close(ours[name][keep], theirs[name][keep], rtol=0, atol=0)
