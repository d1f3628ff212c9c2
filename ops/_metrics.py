"""The metrics of ``evaluate`` (torch side).  See ops/evaluate.py for what each measures.

Each metric is a function ``(subject, params, ctx) -> (values, details)``: ``values`` are
the report's numbers (one table column each), ``details`` anything else worth keeping
(per-layer sparsity, generated answers).  Models run in float32 in eval mode under
``torch.inference_mode``, in right-padded batches with attention masks (left-padded
for generation); padding never counts.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from weightflow.dsl.diagnostics import OpError
from weightflow.ops import _models
from weightflow.ops._data import read_records
from weightflow.ops.evaluate import EvaluateParams, labels, metric_of

LN2 = math.log(2)
REPORT_FORMAT = 1

# (column, better: lower | higher | None, drawn as a chart) per metric; lm-eval's are dynamic.
COLUMNS = {
    "perplexity": [("token_perplexity", "lower", True), ("word_perplexity", "lower", True),
                   ("bits_per_byte", "lower", True), ("tokens", None, False), ("words", None, False),
                   ("bytes", None, False)],
    "accuracy": [("acc", "higher", True), ("acc_norm", "higher", True), ("n", None, False)],
    "loss": [("loss", "lower", True), ("forget_loss", "higher", True), ("retain_loss", "lower", True),
             ("tokens", None, False)],
    "sparsity": [("sparsity", None, True), ("sparsity_all", None, True), ("zeros", None, False),
                 ("numel", None, False)],
    "delta_norm": [("l2", None, True), ("relative", None, True)],
    "refusal": [("refusal_rate", None, True), ("n", None, False)],
}


@dataclass
class Subject:
    """One model under evaluation: its artifact, and the model/tokenizer loaded on demand."""

    art: object
    device: str
    inputs: dict  # the step's inputs: nested refs such as 'metrics.2.delta_norm.base'
    metric_index: int = 0  # which entry of ``metrics`` is being computed
    _model: object = None
    _tok: object = None
    _tok_loaded: bool = False

    @property
    def path(self) -> Path:
        return Path(self.art.path)

    @property
    def model(self):
        if self._model is None:
            self._model = _models.load_model(self.path, self.device)
        return self._model

    @property
    def tokenizer(self):
        if not self._tok_loaded:
            self._tok = _models.load_tokenizer(self.path)
            self._tok_loaded = True
        return self._tok

    def need_tokenizer(self, what: str):
        if self.tokenizer is None:
            raise OpError(f"{what} needs the model's tokenizer, and step '{self.art.step}' has none; "
                          "give pre-tokenized data (input_ids) where the metric accepts it")
        return self.tokenizer

    def release(self) -> None:
        self._model = None
        self._tok = None


# -- token scoring shared by perplexity, multiple choice and loss ---------------------------

def score_windows(model, windows: list[tuple[list[int], list[int], int]], batch_size: int,
                  pad: int, device: str) -> list[float]:
    """Σ log p(y_t | x_≤t) over the last ``n`` positions of each window (x, y, n)."""
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i][0]))
    out = [0.0] * len(windows)
    for lo in range(0, len(order), batch_size):
        idx = order[lo:lo + batch_size]
        width = max(len(windows[i][0]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        attn = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            x = windows[i][0]
            ids[r, :len(x)] = torch.tensor(x)
            attn[r, :len(x)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits
        for r, i in enumerate(idx):
            x, y, n = windows[i]
            t = len(x)
            lp = F.log_softmax(logits[r, t - n:t].float(), dim=-1)
            tgt = torch.tensor(y[t - n:t], device=lp.device)
            out[i] = float(lp.gather(1, tgt.unsqueeze(1)).double().sum())
    return out


def rolling_windows(tokens: list[int], prefix: int, max_length: int) -> list[tuple[list[int], list[int], int]]:
    """Disjoint windows covering ``tokens`` (lm-eval's loglikelihood_rolling).

    The first window reads ``[prefix] + tokens[:L-1]`` and scores ``tokens[:L]``; each
    later window scores the next (up to) L tokens and reads the L tokens before each of
    them: one token of context for a full window, more for the last, partial one.
    """
    if not tokens:
        return []
    first = min(max_length, len(tokens))
    out = [([prefix] + tokens[:first - 1], tokens[:first], first)]
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, max_length)
        end = done + n
        seq = tokens[end - max_length - 1:end]
        out.append((seq[:-1], seq[1:], n))
        done = end
    return out


def _prefix_token(subject: Subject) -> int:
    tok, cfg = subject.tokenizer, subject.model.config
    vocab = subject.model.get_input_embeddings().num_embeddings
    for v in (getattr(tok, "bos_token_id", None), getattr(tok, "eos_token_id", None),
              getattr(cfg, "bos_token_id", None), getattr(cfg, "eos_token_id", None)):
        if isinstance(v, list) and v:
            v = v[0]
        if isinstance(v, int) and 0 <= v < vocab:
            return v
    raise OpError("perplexity needs a BOS or EOS token to condition the first token on; the model "
                  "and its tokenizer define none")


def _max_length(subject: Subject, asked: int | None) -> int:
    if asked:
        return asked
    n = _models.max_positions(subject.model)
    if n is None:
        n = getattr(subject.tokenizer, "model_max_length", None)
        n = n if isinstance(n, int) and 0 < n < 10**7 else 2048
    return n


def _check_ids(path: Path, i: int, ids, vocab: int) -> list[int]:
    if not isinstance(ids, list) or not ids or not all(isinstance(x, int) and not isinstance(x, bool) for x in ids):
        raise OpError(f"{path}: example {i}: 'input_ids' must be a non-empty list of integers")
    bad = next((x for x in ids if x < 0 or x >= vocab), None)
    if bad is not None:
        raise OpError(f"{path}: example {i}: token id {bad} is outside the model's vocabulary of {vocab}")
    return ids


def _require_causal(subject: Subject, metric: str) -> None:
    if not _models.is_causal_lm(subject.model):
        raise OpError(f"{metric} needs a causal LM; step '{subject.art.step}' is a "
                      f"{type(subject.model).__name__}")


# -- metrics ---------------------------------------------------------------------------------

def perplexity(subject: Subject, m, ctx) -> tuple[dict, dict]:
    _require_causal(subject, "perplexity")
    path = ctx.data_path(m.data)
    vocab = subject.model.get_input_embeddings().num_embeddings
    docs: list[tuple[list[int], str | None]] = []
    if path.suffix == ".txt":
        text = path.read_text(encoding="utf-8")
        docs.append((None, text))
    else:
        for i, row in enumerate(read_records(path, m.limit), 1):
            if "input_ids" in row:
                docs.append((_check_ids(path, i, row["input_ids"], vocab), None))
            else:
                docs.append((None, str(row[m.text_field])))
    tok = subject.tokenizer
    if any(ids is None for ids, _ in docs):
        tok = subject.need_tokenizer(f"perplexity on text ({path.name})")
    L = _max_length(subject, m.max_length)
    prefix = _prefix_token(subject)
    windows, owner = [], []
    tokens = words = nbytes = 0
    text_known = True
    for d, (ids, text) in enumerate(docs):
        if ids is None:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            words += len(re.split(r"\s+", text))
            nbytes += len(text.encode("utf-8"))
        else:
            text_known = False
        tokens += len(ids)
        for w in rolling_windows(ids, prefix, L):
            windows.append(w)
            owner.append(d)
    if not tokens:
        raise OpError(f"{path}: no tokens to score")
    ll = sum(score_windows(subject.model, windows, m.batch_size, _models.pad_id(subject.model, tok),
                           subject.device))
    values = {"token_perplexity": _exp(-ll / tokens), "tokens": tokens,
              "word_perplexity": _exp(-ll / words) if text_known else None,
              "bits_per_byte": -ll / nbytes / LN2 if text_known else None,
              "words": words if text_known else None, "bytes": nbytes if text_known else None}
    return values, {"loglikelihood": ll, "documents": len(docs), "windows": len(windows), "max_length": L}


def _exp(x: float) -> float | None:
    """exp(x), or None past float range (a broken model); JSON has no infinity."""
    try:
        return math.exp(x)
    except OverflowError:
        return None


def _encode_pair(tok, context: str, continuation: str, prefix: int) -> tuple[list[int], list[int]]:
    """lm-eval's split of context + continuation into tokens (trailing spaces move right)."""
    if context == "":
        return [prefix], tok(continuation, add_special_tokens=False)["input_ids"]
    n = len(context) - len(context.rstrip())
    if n:
        continuation = context[-n:] + continuation
        context = context[:-n]
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    ctx_ids = tok(context, add_special_tokens=False)["input_ids"]
    return ctx_ids, whole[len(ctx_ids):]


def _gold(path: Path, i: int, value, names: list[str] | None, label2id: dict | None) -> int:
    if isinstance(value, bool):
        raise OpError(f"{path}: example {i}: label {value!r} must be an integer or a name")
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value.strip())
    if isinstance(value, int):
        return value
    if names is not None and value in names:
        return names.index(value)
    if label2id and value in label2id:
        return int(label2id[value])
    raise OpError(f"{path}: example {i}: label {value!r} is not "
                  + ("one of the choices" if names is not None else "in the model's label2id"))


def _architecture(art) -> str | None:
    """The model class named in the checkpoint's config (every Model op writes one)."""
    try:
        archs = json.loads((art.path / "config.json").read_text()).get("architectures") or [None]
    except (OSError, ValueError):
        archs = art.meta.get("architectures") or [None]
    return archs[0]


def _allowed_labels(path: Path, labels, label2id: dict, n: int, examples) -> list[int]:
    """The class ids a classifier's prediction is taken among: all, or the metric's ``labels``
    (a multi-job head scored one job at a time).  Every gold label must be among them."""
    if labels is None:
        return list(range(n))
    ids = []
    for v in labels:
        if isinstance(v, str) and v not in label2id:
            raise OpError(f"accuracy: label {v!r} in 'labels' is not one of the model's labels "
                          f"({', '.join(map(repr, sorted(label2id)))})")
        i = int(label2id[v]) if isinstance(v, str) else v
        if not 0 <= i < n:
            raise OpError(f"accuracy: label {v!r} is outside the model's {n} labels")
        ids.append(i)
    for k, (_, gold) in enumerate(examples, 1):
        if gold not in ids:
            raise OpError(f"{path}: example {k}: its label (id {gold}) is not among the metric's labels {labels}")
    return ids


def accuracy(subject: Subject, m, ctx) -> tuple[dict, dict]:
    path = ctx.data_path(m.data)
    rows = read_records(path, m.limit)
    model = subject.model
    if _models.is_classifier(model):
        tok = subject.tokenizer
        L = m.max_length or _models.max_positions(model) or 512
        vocab = model.get_input_embeddings().num_embeddings
        label2id = {str(k): v for k, v in (model.config.label2id or {}).items()}
        examples = []
        for i, row in enumerate(rows, 1):
            if "input_ids" in row:
                ids = _check_ids(path, i, row["input_ids"], vocab)[:L]
            else:
                ids = subject.need_tokenizer("accuracy on text")(
                    str(row[m.text_field]), truncation=True, max_length=L)["input_ids"]
            gold = _gold(path, i, row[m.label_field], None, label2id)
            if not 0 <= gold < model.config.num_labels:
                raise OpError(f"{path}: example {i}: label {gold} is outside the model's "
                              f"{model.config.num_labels} labels")
            examples.append((ids, gold))
        allowed = _allowed_labels(path, m.labels, label2id, model.config.num_labels, examples)
        pad = _models.pad_id(model, tok)
        correct = 0
        for lo in range(0, len(examples), m.batch_size):
            chunk = examples[lo:lo + m.batch_size]
            width = max(len(e[0]) for e in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            attn = torch.zeros_like(ids)
            for r, (x, _) in enumerate(chunk):
                ids[r, :len(x)] = torch.tensor(x)
                attn[r, :len(x)] = 1
            logits = model(input_ids=ids.to(subject.device), attention_mask=attn.to(subject.device)).logits
            pred = [allowed[j] for j in logits[:, allowed].argmax(-1).tolist()]
            correct += sum(p == g for p, (_, g) in zip(pred, chunk))
        return {"acc": correct / len(examples), "acc_norm": None, "n": len(examples)}, {}
    _require_causal(subject, "accuracy (multiple choice)")
    tok = subject.need_tokenizer("multiple-choice accuracy")
    prefix = _prefix_token(subject)
    L = _max_length(subject, m.max_length)
    windows, spans, golds, lengths = [], [], [], []
    for i, row in enumerate(rows, 1):
        choices = row.get(m.choices_field)
        if not isinstance(choices, list) or len(choices) < 2:
            raise OpError(f"{path}: example {i}: '{m.choices_field}' must be a list of at least two "
                          "choices (causal LMs are scored by multiple choice)")
        choices = [str(c) for c in choices]
        gold = _gold(path, i, row[m.label_field], choices, None)
        if not 0 <= gold < len(choices):
            raise OpError(f"{path}: example {i}: label {gold} is not a choice index")
        start = len(windows)
        for c in choices:
            ctx_ids, cont = _encode_pair(tok, str(row[m.text_field]), m.target_delimiter + c, prefix)
            seq = (ctx_ids + cont)[-(L + 1):]
            windows.append((seq[:-1], seq[1:], len(cont)))
        spans.append((start, len(windows)))
        golds.append(gold)
        lengths.append([float(len(c)) for c in choices])
    lls = score_windows(subject.model, windows, m.batch_size, _models.pad_id(subject.model, tok), subject.device)
    acc = acc_norm = 0
    for (a, b), gold, lens in zip(spans, golds, lengths):
        ll = lls[a:b]
        acc += int(max(range(len(ll)), key=lambda j: ll[j]) == gold)
        acc_norm += int(max(range(len(ll)), key=lambda j: ll[j] / lens[j]) == gold)
    n = len(golds)
    return {"acc": acc / n, "acc_norm": acc_norm / n, "n": n}, {}


def _loss_examples(subject: Subject, m, path: Path) -> list[tuple[list[int], list[bool]]]:
    """(ids, scored) per record, encoded as finetune/unlearn encode their data."""
    rows = read_records(path, m.limit)
    vocab = subject.model.get_input_embeddings().num_embeddings
    tok = subject.tokenizer
    eos = getattr(tok, "eos_token_id", None)
    L = min(m.max_length, _models.max_positions(subject.model) or m.max_length)
    out = []
    for i, row in enumerate(rows, 1):
        if "input_ids" in row:
            ids = _check_ids(path, i, row["input_ids"], vocab)
            scored = [True] * len(ids)
        elif m.prompt_field is not None:
            tok = subject.need_tokenizer("loss on prompt/response text")
            prompt, response = str(row[m.prompt_field]), str(row[m.response_field])
            if m.chat_template:
                if not getattr(tok, "chat_template", None):
                    raise OpError("chat_template: the model's tokenizer has no chat template")
                head = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                               add_generation_prompt=True, tokenize=True)
                head = list(head["input_ids"] if hasattr(head, "keys") else head)
            else:
                head = tok(prompt)["input_ids"]
            tail = tok(response, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
            ids, scored = head + tail, [False] * len(head) + [True] * len(tail)
        else:
            tok = subject.need_tokenizer("loss on text")
            ids = tok(str(row[m.text_field]))["input_ids"]
            if eos is not None and (not ids or ids[-1] != eos):
                ids = ids + [eos]
            scored = [True] * len(ids)
        out.append((ids[:L], scored[:L]))
    return out


def _mean_loss(subject: Subject, m, path: Path) -> tuple[float, int]:
    model = subject.model
    if _models.is_classifier(model):
        rows = read_records(path, m.limit)
        label2id = {str(k): v for k, v in (model.config.label2id or {}).items()}
        tok = subject.need_tokenizer("classifier loss on text")
        total = 0.0
        for lo in range(0, len(rows), m.batch_size):
            chunk = rows[lo:lo + m.batch_size]
            enc = tok([str(r[m.text_field]) for r in chunk], truncation=True, max_length=m.max_length,
                      padding=True, return_tensors="pt")
            gold = torch.tensor([_gold(path, lo + j + 1, r[m.label_field], None, label2id)
                                 for j, r in enumerate(chunk)])
            logits = model(**{k: v.to(subject.device) for k, v in enc.items()}).logits.float()
            total += float(F.cross_entropy(logits, gold.to(logits.device), reduction="sum"))
        return total / len(rows), len(rows)
    _require_causal(subject, "loss")
    examples = _loss_examples(subject, m, path)
    # score exactly the marked targets: split into (x, y, n) with n = scored tail length
    wins, counts = [], 0
    for ids, scored in examples:
        x, y = ids[:-1], ids[1:]
        marks = scored[1:]
        if not any(marks):
            continue
        first = marks.index(True)
        if not all(marks[first:]):
            raise OpError(f"{path}: scored tokens must be one contiguous tail")
        wins.append((x, y, len(x) - first))
        counts += len(x) - first
    if not counts:
        raise OpError(f"{path}: no token to score within max_length {m.max_length}")
    lls = score_windows(model, wins, m.batch_size, _models.pad_id(model, subject.tokenizer), subject.device)
    return -sum(lls) / counts, counts


def loss(subject: Subject, m, ctx) -> tuple[dict, dict]:
    values: dict = {"loss": None, "forget_loss": None, "retain_loss": None}
    tokens = 0
    for key, f in (("loss", m.data), ("forget_loss", m.forget), ("retain_loss", m.retain)):
        if f is not None:
            values[key], n = _mean_loss(subject, m, ctx.data_path(f))
            tokens += n
    values["tokens"] = tokens
    return values, {}


BLOCK = re.compile(r"\.(?:layers|layer|h|blocks|block)\.(\d+)\.")


def sparsity(subject: Subject, m, ctx) -> tuple[dict, dict]:
    """Zeros in the 2-D weights inside the transformer blocks (what pruning targets), per
    block and overall, and over every floating-point tensor."""
    from weightflow.ops._tensors import FLOAT_ST, Checkpoint, row_ranges

    ck = Checkpoint(subject.path, label=f"model '{subject.art.step}'")
    zeros = numel = all_zeros = all_numel = 0
    per_block: dict[str, list[int]] = {}
    try:
        for name in ck.names():
            info = ck.info[name]
            if info.dtype not in FLOAT_ST:
                continue
            z = n = 0
            for lo, hi in row_ranges(info.shape):
                t = ck.get(name, lo, hi)
                z += int((t == 0).sum())
                n += t.numel()
            all_zeros += z
            all_numel += n
            b = BLOCK.search(name)
            if b and len(info.shape) == 2 and name.endswith(".weight"):
                zeros += z
                numel += n
                acc = per_block.setdefault(b.group(1), [0, 0])
                acc[0] += z
                acc[1] += n
    finally:
        ck.close()
    values = {"sparsity": zeros / numel if numel else None, "sparsity_all": all_zeros / all_numel,
              "zeros": zeros, "numel": numel}
    details = {"per_block": {k: v[0] / v[1] for k, v in sorted(per_block.items(), key=lambda kv: int(kv[0]))}}
    return values, details


def delta_norm(subject: Subject, m, ctx) -> tuple[dict, dict]:
    from weightflow.ops._tensors import FLOAT_ST, Checkpoint, row_ranges

    base_art = subject.inputs[f"metrics.{subject.metric_index}.delta_norm.base"]
    a = Checkpoint(subject.path, label=f"model '{subject.art.step}'")
    b = Checkpoint(base_art.path, label=f"base '{base_art.step}'")
    diff = base = 0.0
    try:
        for name in a.names():
            info = a.info[name]
            if info.dtype not in FLOAT_ST:
                continue
            if name not in b:
                raise OpError(f"architectures differ: tensor '{name}' is not in the base '{base_art.step}'")
            if b.info[name].shape != info.shape:
                raise OpError(f"architectures differ: tensor '{name}' has shape {list(info.shape)} but "
                              f"{list(b.info[name].shape)} in the base '{base_art.step}'")
            for lo, hi in row_ranges(info.shape):
                x = a.get(name, lo, hi).to(torch.float64)
                y = b.get(name, lo, hi).to(torch.float64)
                diff += float((x - y).pow(2).sum())
                base += float(y.pow(2).sum())
    finally:
        a.close()
        b.close()
    l2 = math.sqrt(diff)
    return {"l2": l2, "relative": l2 / math.sqrt(base) if base else None}, {"base_digest": base_art.digest}


def refusal(subject: Subject, m, ctx) -> tuple[dict, dict]:
    _require_causal(subject, "refusal")
    tok = subject.need_tokenizer("refusal (generation)")
    path = ctx.data_path(m.prompts)
    if path.suffix == ".txt":
        prompts = [r["text"] for r in read_records(path, m.limit)]
    else:
        prompts = [str(r[m.prompt_field]) for r in read_records(path, m.limit)]
    use_chat = m.chat_template and getattr(tok, "chat_template", None)
    encoded = []
    for p in prompts:
        if use_chat:
            ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                          tokenize=True)
            ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        else:
            ids = tok(p)["input_ids"]
        encoded.append(ids)
    model = subject.model
    pad = _models.pad_id(model, tok)
    eos = getattr(tok, "eos_token_id", None)
    markers = [_fold(x) for x in m.markers]
    answers = []
    for lo in range(0, len(encoded), m.batch_size):
        chunk = encoded[lo:lo + m.batch_size]
        width = max(len(x) for x in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for r, x in enumerate(chunk):  # left padding: generation continues from the right end
            ids[r, width - len(x):] = torch.tensor(x)
            attn[r, width - len(x):] = 1
        gen = model.generate(input_ids=ids.to(subject.device), attention_mask=attn.to(subject.device),
                             max_new_tokens=m.max_new_tokens, do_sample=False, pad_token_id=pad,
                             eos_token_id=eos, temperature=None, top_p=None, top_k=None)
        for r in range(len(chunk)):
            answers.append(tok.decode(gen[r, width:], skip_special_tokens=True))
    refused = [any(mk in _fold(a) for mk in markers) for a in answers]
    details = {"answers": [{"prompt": p, "answer": a, "refused": r}
                           for p, a, r in zip(prompts, answers, refused)]}
    return {"refusal_rate": sum(refused) / len(refused), "n": len(refused)}, details


def _fold(text: str) -> str:
    return text.replace("\u2019", "'").lower()


def lm_eval(subject: Subject, m, ctx) -> tuple[dict, dict]:
    try:
        import lm_eval as lme
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise OpError("the lm-eval metric needs lm-evaluation-harness, which is not installed: "
                      "pip install 'weightflow[eval]' (or pip install lm-eval)") from None
    tok = subject.need_tokenizer("lm-eval")
    include = str(ctx.data_path(m.include_path)) if m.include_path else None
    lm = HFLM(pretrained=subject.model, tokenizer=tok, batch_size=m.batch_size, device=subject.device)
    try:
        tm = TaskManager(include_path=include) if include else TaskManager()
        res = lme.simple_evaluate(model=lm, tasks=list(m.tasks), num_fewshot=m.num_fewshot, limit=m.limit,
                                  task_manager=tm, random_seed=ctx.seed, numpy_random_seed=ctx.seed,
                                  torch_random_seed=ctx.seed, fewshot_random_seed=ctx.seed,
                                  log_samples=False, verbosity="ERROR")
    except Exception as exc:  # unknown task, dataset not available offline, ...
        raise OpError(f"lm-eval failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}") from None
    values, better = {}, {}
    hib = res.get("higher_is_better") or {}
    for task, metrics in (res.get("results") or {}).items():
        for key, v in metrics.items():
            if key == "alias" or "stderr" in key or not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            metric = key.split(",")[0]
            col = f"{task}/{metric}"
            values[col] = float(v)
            h = (hib.get(task) or {}).get(metric)
            better[col] = None if h is None else ("higher" if h else "lower")
    return values, {"better": better, "versions": {"lm_eval": getattr(lme, "__version__", None)}}


def _finite(obj):
    """NaN and infinities (a broken model's loss) become None: JSON has neither."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


IMPLS = {"perplexity": perplexity, "accuracy": accuracy, "loss": loss, "sparsity": sparsity,
         "delta_norm": delta_norm, "refusal": refusal, "lm-eval": lm_eval}
NEEDS_MODEL = {"perplexity", "accuracy", "loss", "refusal", "lm-eval"}


def evaluate(inputs, params: EvaluateParams, ctx) -> dict:
    """Run every metric on every model; write report.json; log the table."""
    import json

    from weightflow.dsl.report import text_table

    if params.device == "cuda" and not torch.cuda.is_available():
        raise OpError("device: cuda, but no CUDA device is available")
    arts = inputs["models"]
    names = labels(params)
    kinds = [metric_of(item) for item in params.metrics]
    results: list[list[dict]] = []
    better_seen: dict[int, dict] = {}
    with ctx.progress(len(arts) * len(kinds), "evaluate", unit="metric") as bar, torch.inference_mode():
        for i, art in enumerate(arts):
            subject = Subject(art=art, device=params.device, inputs=inputs)
            row = []
            for j, (kind, m) in enumerate(kinds):
                subject.metric_index = j
                bar.set_postfix_str(f"{art.step}: {names[j]}")
                values, details = IMPLS[kind](subject, m, ctx)
                if kind == "lm-eval":
                    better_seen.setdefault(j, {}).update(details.pop("better", {}))
                row.append({"values": values, **({"details": details} if details else {})})
                bar.update(1)
            subject.release()
            results.append(row)
    metrics = []
    for j, (kind, m) in enumerate(kinds):
        if kind == "lm-eval":
            cols = []
            for row in results:
                for c in row[j]["values"]:
                    if c not in [x["name"] for x in cols]:
                        cols.append({"name": c, "better": better_seen.get(j, {}).get(c), "chart": True})
        else:
            present = {c for row in results for c, v in row[j]["values"].items() if v is not None}
            cols = [{"name": c, "better": b, "chart": chart} for c, b, chart in COLUMNS[kind] if c in present]
        # file paths and step names are not content (the key has their digests instead)
        params_doc = m.model_dump(mode="json", by_alias=True, exclude_none=True,
                                  exclude={"label", "data", "forget", "retain", "prompts", "include_path",
                                           "base"})
        metrics.append({"label": names[j], "metric": kind, "columns": cols, "params": params_doc})
    report = {
        "format": REPORT_FORMAT,
        "models": [{"digest": a.digest, "architecture": _architecture(a)} for a in arts],
        "metrics": metrics,
        "results": results,
    }
    report = _finite(report)
    (ctx.out / "report.json").write_text(json.dumps(report, indent=1, sort_keys=True, allow_nan=False) + "\n")
    ctx.info["models"] = [{"step": a.step, "digest": a.digest} for a in arts]
    ctx.log(text_table(report, [a.step for a in arts], title=f"{ctx.step}:"))
    return {"models": len(arts), "metrics": names}
