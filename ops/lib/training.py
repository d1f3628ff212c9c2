"""The training machinery shared by ``finetune`` and ``unlearn`` (imports torch).

Read it top to bottom as the ops use it: pick the task and load the model; read and
encode the data (text with the model's tokenizer, or pre-tokenized ``input_ids``);
optionally wrap the model with LoRA adapters; run the optimisation loop; merge the
adapters and hand the weights to ``load.import_directory``.

Determinism: everything random is drawn from explicit seeds -- the global generator
(dropout, new heads, LoRA initialisation) is seeded with the step's seed, the example
order per epoch comes from its own generator seeded with ``shuffle_seed`` -- and
``torch.use_deterministic_algorithms`` is on while a step trains.  On CPU the same
seed, data and params give bit-identical weights on the same machine and library
versions (a different thread count or CPU may change floating-point reduction order).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

# progress lines where no bar is drawn (dsl/engine/progress.py), re-exported for old imports
from weightflow.dsl.engine.progress import PROGRESS_INTERVAL_ENV, ProgressLines, progress_interval  # noqa: F401
from weightflow.dsl.lang.diagnostics import OpError
from weightflow.ops.lib.data import read_records
from weightflow.ops.lib.models import _why as _models_why
from weightflow.ops.lib.models import (  # noqa: F401 (save_model re-exported)
    architectures,
    check_loaded,
    load_tokenizer,
    pad_id,
    quiet_transformers,
    save_model,
)
from weightflow.ops.lib.train_params import (
    TrainParams,
    check_records,
    label_value,
    where,
)

IGNORE = -100  # label of positions without loss (prompt tokens, padding)
TASK_CLASS = {"causal-lm": "ForCausalLM", "sequence-classification": "ForSequenceClassification"}
_DEFAULT_LABEL = "LABEL_{}"


def derived_seed(seed: int, purpose: str) -> int:
    """An independent seed for one purpose (e.g. drawing retain batches) from the step's seed."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{purpose}".encode()).digest()[:7], "big")


@contextlib.contextmanager
def deterministic(seed: int, device: str = "cpu"):
    """Seed the global generator and require deterministic kernels; restore both after."""
    if device == "cuda" and not torch.cuda.is_available():
        raise OpError("device: cuda, but torch sees no CUDA device here (use device: cpu)")
    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    state = torch.random.get_rng_state()
    if device == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=device != "cpu")
    # Deterministic mode also fills every new tensor with NaN (so that reading uninitialised
    # memory shows); that is a write over every activation and gradient of a training step,
    # and no kernel used here reads what it did not write: off, the bytes are the same.
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.utils.deterministic.fill_uninitialized_memory = False  # type: ignore[attr-defined]
    torch.manual_seed(seed)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation notices
            yield
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = fill  # type: ignore[attr-defined]
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)
        torch.random.set_rng_state(state)


# -- the model -----------------------------------------------------------------------

def resolve_task(task: str, model_dir: Path) -> str:
    """The task given, or the one the model's architecture names."""
    if task != "auto":
        return task
    archs = architectures(model_dir)
    for name, suffix in TASK_CLASS.items():
        if any(a.endswith(suffix) for a in archs):
            return name
    raise OpError(f"cannot tell the task from the model's architecture ({', '.join(archs) or 'none'}); "
                  "set task: causal-lm or task: sequence-classification")


def load_model(model_dir: Path, task: str, ctx):
    """The input model in float32 for training (a missing head is initialised, seeded)."""
    import transformers

    if not any(a.endswith(TASK_CLASS[task]) for a in architectures(model_dir)):
        ctx.warn(f"the input model has no {task} head: a new one is initialised from the seed "
                 "(load the model with task: and num_labels: to control it)")
    cls = (transformers.AutoModelForCausalLM if task == "causal-lm"
           else transformers.AutoModelForSequenceClassification)
    try:
        with quiet_transformers():
            model, info = cls.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True,
                                              trust_remote_code=False, output_loading_info=True)
    except Exception as exc:
        raise OpError(f"cannot instantiate the input model as a {task} model ({_models_why(exc)})") from None
    # only the new head may be initialised; a backbone tensor missing from the files is an error
    check_loaded(model, info, None, f"the input model {model_dir}", new_head=True, check_unexpected=False)
    return model


# -- data ----------------------------------------------------------------------------

@dataclass
class Example:
    ids: list[int]
    target: list[int] | int  # per-token labels (causal LM; IGNORE = no loss) or a class id


def read_data(params: TrainParams, path: Path, task: str) -> list[dict]:
    rows = read_records(path, params.limit)
    check_records(path, rows, params, task)
    return rows


def label_ids(model, files: list[tuple[Path, list[dict]]], field: str) -> dict | None:  # noqa: C901
    """Map string labels to class ids (None: the labels are ints already).

    A model whose labels have names (``id2label`` other than LABEL_0, ...) keeps them and
    every string must be one of them; otherwise the strings found in the data, sorted,
    become ids 0..k-1 and the model's ``id2label``/``label2id`` are set from them.
    """
    cfg = model.config
    n = cfg.num_labels
    kinds = {}
    for path, rows in files:
        for i, row in enumerate(rows, 1):
            v = label_value(path, row[field])
            kinds.setdefault(type(v).__name__, (path, i))
    if len(kinds) > 1:
        (p1, i1), (p2, i2) = kinds["int"], kinds["str"]
        raise OpError(f"labels mix integers ({p1.name} {where(p1, i1)}) and strings ({p2.name} {where(p2, i2)}); "
                      "use one kind in every data file")
    if "str" not in kinds:
        for path, rows in files:
            for i, row in enumerate(rows, 1):
                v = label_value(path, row[field])
                if v >= n:
                    raise OpError(f"{path}: {where(path, i)}: label {v} is out of range: the model's head has "
                                  f"{n} labels (0..{n - 1}); load it with num_labels: to change that")
        return None
    id2label = {int(k): str(v) for k, v in (cfg.id2label or {}).items()}
    named = any(v != _DEFAULT_LABEL.format(k) for k, v in id2label.items())
    if named:
        mapping = {v: k for k, v in id2label.items()}
        for path, rows in files:
            for i, row in enumerate(rows, 1):
                v = row[field]
                if v not in mapping:
                    raise OpError(f"{path}: {where(path, i)}: label {v!r} is not one of the model's labels "
                                  f"({', '.join(repr(x) for x in sorted(mapping))})")
        return mapping
    names = sorted({row[field] for _, rows in files for row in rows})
    if len(names) > n:
        raise OpError(f"the data has {len(names)} labels ({', '.join(map(repr, names[:10]))}) but the "
                      f"model's head has {n}; load the model with num_labels: {len(names)}")
    mapping = {name: i for i, name in enumerate(names)}
    cfg.id2label = {i: mapping_name for mapping_name, i in mapping.items()} | {
        i: _DEFAULT_LABEL.format(i) for i in range(len(names), n)}
    cfg.label2id = {v: k for k, v in cfg.id2label.items()}
    return mapping


class Encoder:
    """Turns records into token ids and targets, as the params say."""

    def __init__(self, params: TrainParams, task: str, model, tokenizer, model_dir: Path):
        self.p = params
        self.task = task
        self.tok = tokenizer
        self.model_dir = model_dir
        limit = getattr(model.config, "max_position_embeddings", None)
        self.max_length = min(params.max_length, limit) if isinstance(limit, int) and limit > 0 \
            else params.max_length
        self.eos = getattr(tokenizer, "eos_token_id", None)
        self.vocab = model.get_input_embeddings().num_embeddings
        self.labels: dict | None = None
        self.pad_id = 0
        self.dropped = 0
        self.kept: list[int] = []  # the last encode's rows (0-based) that became examples, in order

    def _tokenizer(self, path: Path):
        if self.tok is None:
            raise OpError(f"{path}: text data needs the model's tokenizer, and {self.model_dir.name} has "
                          "none; save a tokenizer into the model directory before loading it, or give "
                          "pre-tokenized examples ({\"input_ids\": [...]} per line)")
        return self.tok

    def _ids(self, path: Path, i: int, value, what: str) -> list[int]:
        if not isinstance(value, list) or not value or not all(
                isinstance(x, int) and not isinstance(x, bool) for x in value):
            raise OpError(f"{path}: {where(path, i)}: '{what}' must be a non-empty list of integers")
        bad = next((x for x in value if (x < 0 or x >= self.vocab) and not (what == "labels" and x == IGNORE)),
                   None)
        if bad is not None:
            raise OpError(f"{path}: {where(path, i)}: token id {bad} in '{what}' is outside the model's "
                          f"vocabulary of {self.vocab}")
        return value

    def encode(self, path: Path, rows: list[dict]) -> list[Example]:  # noqa: C901
        p, out, dropped, kept = self.p, [], 0, []
        for i, row in enumerate(rows, 1):
            if "input_ids" in row:
                ids = self._ids(path, i, row["input_ids"], "input_ids")
                labels = self._ids(path, i, row["labels"], "labels") if "labels" in row else list(ids)
                if len(labels) != len(ids):
                    raise OpError(f"{path}: {where(path, i)}: 'labels' has {len(labels)} entries, "
                                  f"'input_ids' {len(ids)}")
            elif p.prompt_field is not None:
                tok = self._tokenizer(path)
                prompt, response = str(row[p.prompt_field]), str(row[p.response_field])
                if p.chat_template:
                    if not getattr(tok, "chat_template", None):
                        raise OpError(f"chat_template: the tokenizer of {self.model_dir.name} has no chat template")
                    head = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                                   add_generation_prompt=True, tokenize=True)
                    head = list(head["input_ids"] if hasattr(head, "keys") else head)
                else:
                    head = tok(prompt)["input_ids"]
                tail = tok(response, add_special_tokens=False)["input_ids"]
                if self.eos is not None:
                    tail = tail + [self.eos]
                ids = head + tail
                labels = [IGNORE] * len(head) + tail
            else:
                tok = self._tokenizer(path)
                text = str(row[p.text_field])
                if self.task == "sequence-classification":
                    ids = tok(text, truncation=True, max_length=self.max_length)["input_ids"]
                else:
                    ids = tok(text)["input_ids"]
                    if self.eos is not None and (not ids or ids[-1] != self.eos):
                        ids = ids + [self.eos]
                labels = list(ids)
            ids, labels = ids[: self.max_length], labels[: self.max_length]
            if self.task == "sequence-classification":
                v = label_value(path, row[p.label_field])
                out.append(Example(ids, self.labels[v] if self.labels is not None else v))
                kept.append(i - 1)
            elif any(t != IGNORE for t in labels[1:]):
                out.append(Example(ids, labels))
                kept.append(i - 1)
            else:
                dropped += 1
        if not out:
            raise OpError(f"{path}: no example has a token to predict within max_length {self.max_length}")
        self.dropped, self.kept = dropped, kept
        return out


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor  # [B, T] token labels (causal LM) or [B] class ids
    position_ids: torch.Tensor | None = None  # packed rows (``pack``): positions restart per example


def collate(examples: list[Example], pad_id: int, task: str, device: str = "cpu") -> Batch:
    """Right-padded tensors; padding is masked out of attention and loss."""
    width = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    if task == "causal-lm":
        labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    else:
        labels = torch.tensor([e.target for e in examples], dtype=torch.long)
    for row, e in enumerate(examples):
        ids[row, : len(e.ids)] = torch.tensor(e.ids)
        mask[row, : len(e.ids)] = 1
        if task == "causal-lm":
            labels[row, : len(e.target)] = torch.tensor(e.target)
    return Batch(ids.to(device), mask.to(device), labels.to(device))


def batch_order(n: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Endless batches of example indices: a fresh permutation every epoch, from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(n, generator=g).tolist()
        for i in range(0, n, batch_size):
            yield perm[i: i + batch_size]


def length_grouped_order(lengths: list[int], batch_size: int, seed: int, mega: int = 50) -> Iterator[list[int]]:
    """Endless batches of examples of similar length (HF Trainer's ``group_by_length``).

    Every epoch: a fresh permutation from ``seed``; cut into mega-batches of ``mega`` ×
    ``batch_size`` examples, each sorted by length (longest first, ties in permutation order)
    and cut into batches; then the batches of the epoch are shuffled by the same generator,
    so long and short batches alternate.  Padding per batch shrinks to the spread of lengths
    within it; the order is a function of ``seed`` and the lengths only.
    """
    g = torch.Generator().manual_seed(seed)
    n = len(lengths)
    while True:
        perm = torch.randperm(n, generator=g).tolist()
        batches = []
        for lo in range(0, n, mega * batch_size):
            group = sorted(perm[lo: lo + mega * batch_size], key=lambda i: -lengths[i])
            batches += [group[i: i + batch_size] for i in range(0, len(group), batch_size)]
        for b in torch.randperm(len(batches), generator=g).tolist():
            yield batches[b]


def pack(examples: list[Example], pad_id: int, capacity: int, device: str = "cpu") -> Batch:
    """A causal-LM batch packed into as few rows of ``capacity`` tokens as fit (first fit,
    longest first), padded to the longest row.

    Each example keeps its own positions (``position_ids`` restart at 0) and the first token
    of each has no label, so no token is predicted from another example; ``attention_mask``
    is all ones and the model is called without it, which makes transformers build the
    block-diagonal causal mask from the restarting positions (masking_utils'
    ``find_packed_sequence_indices``).  Padding at a row's end is a segment of its own, with
    no labels.  The summed NLL and the target count are then those of ``collate``'s batch.
    """
    rows: list[list[Example]] = []
    room: list[int] = []
    for e in sorted(examples, key=lambda e: -len(e.ids)):
        k = next((i for i, r in enumerate(room) if r >= len(e.ids)), None)
        if k is None:
            rows.append([])
            room.append(capacity)
            k = len(rows) - 1
        rows[k].append(e)
        room[k] -= len(e.ids)
    width = max(capacity - r for r in room)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    for row, members in enumerate(rows):
        at = 0
        for e in members:
            n = len(e.ids)
            ids[row, at: at + n] = torch.tensor(e.ids)
            labels[row, at + 1: at + n] = torch.tensor(e.target[1:])
            pos[row, at: at + n] = torch.arange(n)
            at += n
        pos[row, at:] = torch.arange(width - at)  # padding: a segment of its own
    mask = torch.ones_like(ids)
    return Batch(ids.to(device), mask.to(device), labels.to(device), pos.to(device))


def check_packing(model, task: str, examples: list[Example], pad_id: int, device: str = "cpu") -> None:
    """Refuse ``packing`` but for a causal LM whose attention isolates packed examples: the
    logits of two examples packed in one row must equal their logits alone."""
    if task != "causal-lm":
        raise OpError(f"packing applies to causal-lm fine-tunes; this one is {task} (use group_by_length "
                      "to cut padding instead)")
    pair = sorted(examples[:2], key=lambda e: -len(e.ids))
    if len(pair) < 2:
        return
    was_training = model.training
    model.eval()
    with torch.no_grad():
        packed = _logits(model, pack(pair, pad_id, sum(len(e.ids) for e in pair), device), "causal-lm")[0]
        alone = [_logits(model, collate([e], pad_id, "causal-lm", device), "causal-lm")[0] for e in pair]
    model.train(was_training)
    n0 = len(pair[0].ids)
    if not (torch.allclose(packed[:n0], alone[0], atol=1e-3, rtol=1e-3)
            and torch.allclose(packed[n0:n0 + len(pair[1].ids)], alone[1], atol=1e-3, rtol=1e-3)):
        raise OpError(f"packing: {type(model).__name__} lets packed examples attend to each other (its "
                      "attention does not follow restarting position ids); set packing: false")


def total_steps(params: TrainParams, n_examples: int) -> int:
    """Optimizer steps: ``max_steps``, or ``epochs`` over the data (HF Trainer's count)."""
    if params.max_steps is not None:
        return params.max_steps
    per_epoch = math.ceil(math.ceil(n_examples / params.batch_size) / params.gradient_accumulation_steps)
    return max(1, math.ceil(params.epochs * per_epoch))


# -- losses --------------------------------------------------------------------------

def _logits(model, batch: Batch, task: str) -> torch.Tensor:
    kwargs = {"use_cache": False} if task == "causal-lm" else {}
    if batch.position_ids is not None:  # packed rows: the mask comes from the positions
        return model(input_ids=batch.input_ids, position_ids=batch.position_ids, **kwargs).logits.float()
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **kwargs).logits.float()


def sequence_nll(model, batch: Batch, task: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per example: summed NLL of its targets (−log π(y)), number of target tokens; the logits.

    Causal LM: token t is predicted from the logits at t−1.  Classification: one target,
    the label.
    """
    logits = _logits(model, batch, task)
    if task == "causal-lm":
        lg, lb = logits[:, :-1], batch.labels[:, 1:]
        nll = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), lb.reshape(-1), ignore_index=IGNORE,
                              reduction="none").view(lb.shape)
        return nll.sum(1), (lb != IGNORE).sum(1), logits
    nll = F.cross_entropy(logits, batch.labels, reduction="none")
    return nll, torch.ones_like(nll, dtype=torch.long), logits


def _decoder_and_head(model):
    """The transformer body and the LM head of a causal LM (under a peft wrapper too), or an
    OpError when the model is not built as body → head."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    body, head = getattr(inner, "base_model", inner), inner.get_output_embeddings()
    if body is inner or head is None:
        raise OpError(f"target_logits_only: {type(inner).__name__} has no separate body and LM head; "
                      "set target_logits_only: false")
    return body, head


def target_nll(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal LM: ``sequence_nll``'s per-example summed NLL and target count, with the LM head
    and the softmax computed only at the positions that predict a target.

    The body runs on every token (each token is context); the vocabulary projection, the
    largest single matmul of a small LM, and the log-softmax over the vocabulary run only on
    the rows whose next token has a label: the response tokens of prompt/response data, never
    padding.  The loss is the same function; the head's gradient is a sum over fewer rows,
    so its last bits can differ (hence opt-in, and in the key).
    """
    body, head = _decoder_and_head(model)
    given = ({"position_ids": batch.position_ids} if batch.position_ids is not None
             else {"attention_mask": batch.attention_mask})
    hidden = body(input_ids=batch.input_ids, use_cache=False, **given).last_hidden_state
    labels = batch.labels[:, 1:]
    at = labels != IGNORE
    logits = head(hidden[:, :-1][at]).float()
    nll = F.cross_entropy(logits, labels[at], reduction="none")
    per_row = torch.zeros(labels.shape[0], dtype=nll.dtype, device=nll.device).index_add(0, at.nonzero()[:, 0], nll)
    return per_row, at.sum(1)


def check_target_logits(model, task: str, examples: list[Example], pad_id: int, device: str = "cpu") -> None:
    """Refuse ``target_logits_only`` but for a causal LM whose logits are its head applied to its
    body's output (no logit scaling or soft-capping after the head): on two examples, the
    losses of both paths must agree."""
    if task != "causal-lm":
        raise OpError(f"target_logits_only applies to causal-lm fine-tunes; this one is {task}")
    batch = collate(examples[:2], pad_id, task, device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        full, n_full, _ = sequence_nll(model, batch, task)
        ours, n_ours = target_nll(model, batch)
    model.train(was_training)
    if not (torch.equal(n_full, n_ours) and torch.allclose(full, ours, rtol=1e-4, atol=1e-4)):
        raise OpError(f"target_logits_only: {type(model).__name__}'s logits are not its LM head applied to "
                      "its last hidden state (it scales or caps them); set target_logits_only: false")


def mean_nll(nll_sum: torch.Tensor, n_tokens: torch.Tensor) -> torch.Tensor:
    """Token-averaged NLL over a batch (what a model's built-in ``loss`` is)."""
    return nll_sum.sum() / n_tokens.sum().clamp(min=1)


def kl_to_reference(model, ref, batch: Batch, task: str) -> torch.Tensor:
    """KL(π_ref ‖ π_θ) per target position (per example for classification), averaged."""
    cur = _logits(model, batch, task)
    with torch.no_grad():
        old = _logits(ref, batch, task)
    if task == "causal-lm":
        cur, old = cur[:, :-1], old[:, :-1]
        mask = (batch.labels[:, 1:] != IGNORE).float()
    else:
        mask = torch.ones(cur.shape[0], device=cur.device)
    lp, lq = F.log_softmax(cur, -1), F.log_softmax(old, -1)
    kl = (lq.exp() * (lq - lp)).sum(-1)
    return (kl * mask).sum() / mask.sum().clamp(min=1)


@torch.no_grad()
def evaluate(model, examples: list[Example], batch_size: int, pad_id: int, task: str,
             device: str = "cpu") -> dict:
    """Mean token NLL over ``examples`` in eval mode (and accuracy for classification)."""
    was_training = model.training
    model.eval()
    total, tokens, correct = 0.0, 0, 0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i: i + batch_size]
        batch = collate(chunk, pad_id, task, device)
        nll_sum, n_tok, logits = sequence_nll(model, batch, task)
        total += float(nll_sum.double().sum())
        tokens += int(n_tok.sum())
        if task == "sequence-classification":
            correct += int((logits.argmax(-1) == batch.labels).sum())
    model.train(was_training)
    out = {"loss": total / max(tokens, 1)}
    if task == "sequence-classification":
        out["accuracy"] = correct / len(examples)
    return out


# -- LoRA ----------------------------------------------------------------------------

def _adaptable(model) -> list[str]:
    from transformers.pytorch_utils import Conv1D

    kinds = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, Conv1D)
    return [n for n, m in model.named_modules() if n and isinstance(m, kinds)]


def attach_lora(model, lora, task: str):
    """Wrap ``model`` with LoRA adapters (peft); a target that matches no module is an error."""
    try:
        from peft import LoraConfig, TaskType, get_peft_model
    except ImportError:
        raise OpError("lora needs peft: pip install peft") from None
    names = _adaptable(model)
    targets = lora.target_modules
    if isinstance(targets, list):
        missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
        if missing:
            short = sorted({n.rsplit(".", 1)[-1] for n in names})
            raise OpError(f"lora.target_modules: no module of the model matches {', '.join(map(repr, missing))}; "
                          f"its adaptable modules are named {', '.join(short)} (or use 'all-linear')")
    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
        modules_to_save=lora.modules_to_save,
        task_type=TaskType.SEQ_CLS if task == "sequence-classification" else TaskType.CAUSAL_LM)
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise OpError(f"lora: {str(exc).splitlines()[0]}") from None


def enable_checkpointing(model, lora: bool) -> None:
    """Recompute activations in backward instead of keeping them (less memory, ~30% slower)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise OpError(f"gradient_checkpointing: {type(model).__name__} does not support it")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora:
        model.enable_input_require_grads()  # so checkpointed blocks see inputs that need grads


def save_adapter(peft_model, out: Path, tmp_root: Path) -> None:
    """The adapter as ``adapter/`` (weights + config, stripped of paths and versions)."""
    with tempfile.TemporaryDirectory(dir=tmp_root) as tmp:
        peft_model.save_pretrained(tmp)
        dest = out / "adapter"
        dest.mkdir()
        shutil.copyfile(Path(tmp) / "adapter_model.safetensors", dest / "adapter_model.safetensors")
        cfg = json.loads((Path(tmp) / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = None
        cfg.pop("peft_version", None)
        for key in ("target_modules", "modules_to_save"):  # sets in peft: make the order stable
            if isinstance(cfg.get(key), list):
                cfg[key] = sorted(cfg[key])
        (dest / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


# -- optimisation --------------------------------------------------------------------

#: Elements per parameter group of AdamW's multi-tensor (foreach) path: it makes temporaries the
#: size of a whole group, so groups are cut to bound them (64 MB of float32).
FOREACH_GROUP_ELEMENTS = 1 << 24


def _cut(tensors: list, limit: int = FOREACH_GROUP_ELEMENTS) -> list[list]:
    out: list[list] = []
    size = 0
    for t in tensors:
        if not out or (size + t.numel() > limit and out[-1]):
            out.append([])
            size = 0
        out[-1].append(t)
        size += t.numel()
    return out


def make_optimizer(model, params: TrainParams):
    """AdamW or SGD; weight decay on matrices only (not on biases and norm weights).

    AdamW runs torch's multi-tensor (``foreach``) implementation: the same arithmetic per
    element as the one-tensor-at-a-time loop, bit for bit (checked), with a fraction of the
    per-tensor dispatch cost; its parameter groups are cut at ``FOREACH_GROUP_ELEMENTS`` so its
    temporaries stay small.  Each element's update depends only on its own gradient and state,
    so cutting the groups changes nothing.  ``adamw_torch_fused`` is torch's fused kernel
    (HF Trainer's default): about 4x faster again, rounded differently in the last bit.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": params.weight_decay},
              {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if params.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=params.learning_rate)
    if params.optimizer == "adamw_torch_fused":
        return torch.optim.AdamW(groups, lr=params.learning_rate, betas=(0.9, 0.999), eps=1e-8, fused=True)
    groups = [{**g, "params": part} for g in groups for part in _cut(g["params"])]
    return torch.optim.AdamW(groups, lr=params.learning_rate, betas=(0.9, 0.999), eps=1e-8, foreach=True)


def make_scheduler(optimizer, params: TrainParams, steps: int):
    """Linear warm-up over ``warmup_ratio`` of the steps, then linear/cosine decay or constant."""
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup"}.get(params.lr_scheduler, params.lr_scheduler)
    return get_scheduler(name, optimizer, num_warmup_steps=math.ceil(params.warmup_ratio * steps),
                         num_training_steps=steps)


def train(model, params: TrainParams, ctx, steps: int, micro_loss: Callable[[], tuple[torch.Tensor, dict]],
          on_step: Callable[[int], None] | None = None) -> list[dict]:
    """The loop: ``steps`` optimizer steps of ``gradient_accumulation_steps`` micro-batches.

    ``micro_loss()`` draws the next micro-batch and returns (loss, numbers to log).
    Returns the training curve: step, lr and the logged numbers, every ``logging_steps``.
    """
    optimizer = make_optimizer(model, params)
    scheduler = make_scheduler(optimizer, params, steps)
    trainable = [p for p in model.parameters() if p.requires_grad]
    accum = params.gradient_accumulation_steps
    curve: list[dict] = []
    model.train()
    device = "cuda" if any(p.is_cuda for p in trainable[:1]) else "cpu"
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=bool(getattr(params, "bf16", False)))
    started = time.perf_counter()
    with ctx.progress(steps, "train step", unit="step") as bar:
        for step in range(1, steps + 1):
            logs: dict[str, float] = {}
            for _ in range(accum):
                with autocast:
                    loss, parts = micro_loss()
                if not torch.isfinite(loss):
                    raise OpError(f"training diverged at step {step}: the loss is {float(loss)}; "
                                  "lower learning_rate (or max_grad_norm)")
                (loss / accum).backward()
                for k, v in parts.items():
                    logs[k] = logs.get(k, 0.0) + float(v) / accum
            if params.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(trainable, params.max_grad_norm)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if step % params.logging_steps == 0 or step == steps:
                curve.append({"step": step, **{k: round(v, 6) for k, v in logs.items()}, "lr": lr})
            bar.set_postfix(loss=logs.get("loss", 0.0), lr=lr)
            bar.update(1)
            if on_step is not None:
                on_step(step)
    # manifest only (not content): the loop's seconds, summed over calls (S3T trains in stages)
    timing = ctx.info.setdefault("timing", {})
    timing["train_loop_s"] = round(timing.get("train_loop_s", 0.0) + time.perf_counter() - started, 3)
    return curve


# -- output --------------------------------------------------------------------------

def prepare(model, params: TrainParams, task: str, model_dir: Path, ctx, files: dict[str, str | None],
            ) -> tuple[Encoder, dict[str, list[Example]]]:
    """Read every data file, map labels, encode: all input errors surface here, before training."""
    tokenizer = load_tokenizer(model_dir)
    encoder = Encoder(params, task, model, tokenizer, model_dir)
    raw = {role: (ctx.data_path(f), read_data(params, ctx.data_path(f), task))
           for role, f in files.items() if f is not None}
    if task == "sequence-classification":
        encoder.labels = label_ids(model, list(raw.values()), params.label_field)
    encoded = {}
    for role, (path, rows) in raw.items():
        encoded[role] = encoder.encode(path, rows)
        if encoder.dropped:
            ctx.warn(f"{path.name}: {encoder.dropped} example(s) have no target token within "
                     f"max_length {encoder.max_length} and are skipped")
    encoder.pad_id = pad_id(model, tokenizer)
    if task == "sequence-classification" and model.config.pad_token_id is None:
        model.config.pad_token_id = encoder.pad_id  # heads that pool the last token need it
    return encoder, encoded
