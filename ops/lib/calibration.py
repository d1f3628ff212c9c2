"""Calibration inputs: text or pre-tokenized samples, and per-Linear input statistics.

Text (``.txt``, or ``.jsonl`` with a ``text_field``) is tokenized, documents joined
with the tokenizer's EOS, and cut into consecutive windows of ``seq_len`` from the
start (``random: true`` draws window positions with ``seed``).  Pre-tokenized
``.jsonl`` lines with an ``input_ids`` list are one sample each (truncated to
``seq_len``) and need no tokenizer.
"""

from __future__ import annotations

import random as _random
from pathlib import Path

import torch

from weightflow.dsl.lang.diagnostics import OpError
from weightflow.ops.lib.data import read_records
from weightflow.ops.lib.params import Calibration


def windows(cal: Calibration, data_path: Path, model_dir: Path, max_len: int | None) -> list[torch.Tensor]:
    """The calibration samples as 1-D LongTensors."""
    seq_len = min(cal.seq_len, max_len) if max_len else cal.seq_len
    if data_path.suffix == ".jsonl":
        rows = read_records(data_path)
        if rows and "input_ids" in rows[0]:
            out = []
            for i, row in enumerate(rows[: cal.samples], 1):
                ids = row.get("input_ids")
                if not isinstance(ids, list) or not ids or not all(isinstance(x, int) for x in ids):
                    raise OpError(f"{data_path}: line {i}: 'input_ids' must be a non-empty list of ints")
                out.append(torch.tensor(ids[:seq_len], dtype=torch.long))
            return out
        texts = []
        for i, row in enumerate(rows, 1):
            if cal.text_field not in row:
                raise OpError(f"{data_path}: line {i} has no field '{cal.text_field}'")
            texts.append(str(row[cal.text_field]))
    else:
        texts = [t for t in data_path.read_text(encoding="utf-8", errors="replace").splitlines() if t.strip()]
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    except Exception as exc:
        raise OpError(f"calibration text needs the model's tokenizer, and none loads from it ({exc}); "
                      "give pre-tokenized .jsonl with input_ids instead") from None
    sep = [tok.eos_token_id] if tok.eos_token_id is not None else []
    ids: list[int] = []
    for t in texts:
        ids.extend(tok(t, add_special_tokens=False)["input_ids"] + sep)
    if len(ids) < seq_len:
        raise OpError(f"calibration data {data_path.name} has {len(ids)} tokens, fewer than seq_len {seq_len}")
    n_windows = len(ids) // seq_len
    if cal.random:
        rng = _random.Random(cal.seed)
        starts = [rng.randint(0, len(ids) - seq_len) for _ in range(cal.samples)]
    else:
        starts = [i * seq_len for i in range(min(cal.samples, n_windows))]
    return [torch.tensor(ids[s:s + seq_len], dtype=torch.long) for s in starts]


def linear_input_means(model: torch.nn.Module, samples: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mean input activation per input column of every nn.Linear, over all tokens."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            def hook(_m, inp, _out, name=name):
                x = inp[0].detach().reshape(-1, inp[0].shape[-1]).to(torch.float64)
                sums[name] = sums.get(name, 0) + x.sum(0)
                counts[name] = counts.get(name, 0) + x.shape[0]
            hooks.append(mod.register_forward_hook(hook))
    try:
        with torch.inference_mode():
            for ids in samples:
                model(ids.unsqueeze(0))
    finally:
        for h in hooks:
            h.remove()
    return {f"{n}.weight": (sums[n] / counts[n]).to(torch.float32) for n in sums}
