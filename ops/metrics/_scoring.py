"""Torch code shared by the metrics: the model under evaluation, and token scoring.

Models run in float32 in eval mode under ``torch.inference_mode``, in right-padded batches
with attention masks (left-padded for generation); padding never counts.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from weightflow.dsl.engine.context import Artifact, Inputs
from weightflow.dsl.lang.diagnostics import OpError
from weightflow.ops.lib import models
from weightflow.ops.lib.data import read_records


@dataclass
class Subject:
    """One model under evaluation: its artifact, and the model/tokenizer loaded on demand."""

    art: Artifact
    device: str
    inputs: Inputs  # the evaluate step's inputs; read nested refs through ``ref``
    metric_index: int = 0  # which entry of ``metrics`` is being computed
    metric_name: str = ""
    _model: object = None
    _tok: object = None
    _tok_loaded: bool = False

    def ref(self, field: str) -> Artifact:
        """The artifact of the step named by param ``field`` of the metric being computed.

        The one place that knows where refs inside ``metrics`` items are: at their field path,
        e.g. ``('metrics', 2, 'delta_norm', 'base')``.
        """
        return self.inputs.at(("metrics", self.metric_index, self.metric_name, field))

    @property
    def path(self) -> Path:
        return Path(self.art.path)

    @property
    def model(self):
        if self._model is None:
            self._model = models.load_model(self.path, self.device)
        return self._model

    @property
    def tokenizer(self):
        if not self._tok_loaded:
            self._tok = models.load_tokenizer(self.path)
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


def require_causal(subject: Subject, metric: str) -> None:
    if not models.is_causal_lm(subject.model):
        raise OpError(f"{metric} needs a causal LM; step '{subject.art.step}' is a "
                      f"{type(subject.model).__name__}")


def check_ids(path: Path, i: int, ids, vocab: int) -> list[int]:
    if not isinstance(ids, list) or not ids or not all(isinstance(x, int) and not isinstance(x, bool) for x in ids):
        raise OpError(f"{path}: example {i}: 'input_ids' must be a non-empty list of integers")
    bad = next((x for x in ids if x < 0 or x >= vocab), None)
    if bad is not None:
        raise OpError(f"{path}: example {i}: token id {bad} is outside the model's vocabulary of {vocab}")
    return ids


def gold(path: Path, i: int, value, names: list[str] | None, label2id: dict | None) -> int:
    """A gold label as a class (or choice) index: an integer, or a name among ``names`` or in
    ``label2id``."""
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


def prefix_token(subject: Subject) -> int:
    """The token the first scored token is conditioned on: BOS, else EOS."""
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


def max_length(subject: Subject, asked: int | None) -> int:
    if asked:
        return asked
    n = models.max_positions(subject.model)
    if n is None:
        n = getattr(subject.tokenizer, "model_max_length", None)
        n = n if isinstance(n, int) and 0 < n < 10**7 else 2048
    return n


# -- token scoring shared by perplexity, multiple choice and the losses ----------------------

def forward_batches(model, seqs: list[list[int]], batch_size: int, pad: int,
                    device: str) -> Iterator[tuple[int, torch.Tensor]]:
    """(index, logits row) of every sequence of ``seqs``, run longest first in right-padded
    batches with attention masks; a row's logits are valid up to the sequence's length."""
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    for lo in range(0, len(order), batch_size):
        idx = order[lo:lo + batch_size]
        width = max(len(seqs[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        attn = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            x = seqs[i]
            ids[r, :len(x)] = torch.tensor(x)
            attn[r, :len(x)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits
        for r, i in enumerate(idx):
            yield i, logits[r]


def score_windows(model, windows: list[tuple[list[int], list[int], int]], batch_size: int,
                  pad: int, device: str) -> list[float]:
    """Σ log p(y_t | x_≤t) over the last ``n`` positions of each window (x, y, n)."""
    import torch.nn.functional as F

    out = [0.0] * len(windows)
    order, sums = [], []
    for i, logits in forward_batches(model, [w[0] for w in windows], batch_size, pad, device):
        x, y, n = windows[i]
        t = len(x)
        lp = F.log_softmax(logits[t - n:t].float(), dim=-1)
        tgt = torch.tensor(y[t - n:t], device=lp.device)
        order.append(i)
        sums.append(lp.gather(1, tgt.unsqueeze(1)).double().sum())
    for i, v in zip(order, torch.stack(sums).tolist() if sums else [], strict=True):  # one transfer, not one per window
        out[i] = v
    return out


Window = tuple[list[int], list[int], int]  # (input tokens x, targets y, scored tail length n)


def shared_prefix(group: list[Window]) -> int:
    """How many leading input tokens every window of ``group`` has in common, at most up to
    and including the first scored position of each (so the prefix contributes at most its
    last position's logits): the part run once for all of them."""
    k = min(min(len(x) - n for x, _, n in group) + 1, min(len(x) for x, _, _ in group))
    first = group[0][0]
    for x, _, _ in group[1:]:
        j = 0
        while j < k and x[j] == first[j]:
            j += 1
        k = j
    return max(k, 0)


def _forward_params(model) -> set[str]:
    """The names ``model``'s forward takes (``logits_to_keep``: logits at some positions only;
    the key/value cache is ``cache`` from transformers 5.24, ``past_key_values`` before)."""
    import inspect

    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def _plain_cache(cache) -> list | None:
    """The cache's layers when every one is a plain growing key/value cache (what the prefix
    path can select rows of and extend); None otherwise (sliding windows, hybrids, ...)."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if not layers or not all(type(layer) is DynamicLayer for layer in layers):
        return None
    return list(layers)


def _run_prefixes(model, prefixes: list[list[int]], pad: int, device: str, keep: bool):
    """One right-padded forward of ``prefixes`` (longest first) keeping the key/value cache:
    (each row's last-position logits, the cache, its layers or None, the attention mask)."""
    width = len(prefixes[0])
    ids = torch.full((len(prefixes), width), pad, dtype=torch.long)
    attn = torch.zeros((len(prefixes), width), dtype=torch.long)
    for r, p in enumerate(prefixes):
        ids[r, :len(p)] = torch.tensor(p)
        attn[r, :len(p)] = 1
    lasts = sorted({len(p) - 1 for p in prefixes})
    kwargs = {"logits_to_keep": torch.tensor(lasts)} if keep and len(lasts) < width else {}
    res = model(input_ids=ids.to(device), attention_mask=attn.to(device), use_cache=True, **kwargs)
    cache = getattr(res, "cache", None) or getattr(res, "past_key_values", None)
    at = {p: j for j, p in enumerate(lasts)} if kwargs else {p: p for p in lasts}
    last = torch.stack([res.logits[r, at[len(p) - 1]] for r, p in enumerate(prefixes)])
    return last, cache, _plain_cache(cache), attn.to(device)


def _window_score(x: list[int], y: list[int], n: int, k: int, last: torch.Tensor,
                  suffix_logits: torch.Tensor | None) -> torch.Tensor:
    """Σ log p of a window's n scored targets from its prefix's last logits (position k-1)
    and its own logits after the prefix (positions k..), float64."""
    import torch.nn.functional as F

    t = len(x)
    if n <= 0:
        return torch.zeros((), dtype=torch.float64)
    parts = [last.unsqueeze(0)] if t - n == k - 1 else []
    if t > k:
        parts.append(suffix_logits[max(t - n - k, 0):t - k])
    lp = F.log_softmax(torch.cat(parts).float(), dim=-1)
    tgt = torch.tensor(y[t - n:t], device=lp.device)
    return lp.gather(1, tgt.unsqueeze(1)).double().sum()


def score_window_groups(model, groups: list[list[Window]], batch_size: int, pad: int,
                        device: str) -> list[list[float]]:
    """``score_windows`` of each group of windows that share their first tokens (the choices
    of one multiple-choice question: context + choice), with the shared prefix run once.

    Each group's common prefix (``shared_prefix``) runs once, longest first in right-padded
    batches of ``batch_size`` keeping its key/value cache; then every window's remaining
    tokens run on top of its prefix's cache (rows of the cache selected per window, right
    padded, positions continuing after the prefix), so the context of a question with c
    choices is computed once, not c times.  Log-probabilities are taken at the scored
    positions only.  The values equal ``score_windows``'s up to float rounding (attention
    over a cache instead of one sequence), which is what lm-eval's own batching varies by.
    Models that do not keep a plain cache (composites, sliding-window attention) take
    ``score_windows``.
    """
    from transformers import PreTrainedModel

    starts = [0]
    for g in groups:
        starts.append(starts[-1] + len(g))

    def plain() -> list[list[float]]:
        lls = score_windows(model, [w for g in groups for w in g], batch_size, pad, device)
        return [lls[a:b] for a, b in zip(starts, starts[1:], strict=False)]

    prefixes = [shared_prefix(g) if g else 0 for g in groups]
    if not isinstance(model, PreTrainedModel) or not groups or min(prefixes) < 1:
        return plain()
    takes = _forward_params(model)
    cache_arg = "cache" if "cache" in takes else "past_key_values"
    out: list[list[float]] = [[0.0] * len(g) for g in groups]
    order = sorted(range(len(groups)), key=lambda i: -prefixes[i])
    for lo in range(0, len(order), batch_size):
        gi = order[lo:lo + batch_size]
        last, cache, layers, attn = _run_prefixes(model, [groups[g][0][0][:prefixes[g]] for g in gi], pad,
                                                  device, "logits_to_keep" in takes)
        if layers is None:
            return plain()
        saved = [(layer.keys, layer.values) for layer in layers]
        # every window of these groups continues from its prefix's row: (row, group, choice),
        # the most remaining tokens first
        rows = sorted(((r, g, j) for r, g in enumerate(gi) for j in range(len(groups[g]))),
                      key=lambda t: prefixes[t[1]] - len(groups[t[1]][t[2]][0]))
        for s_lo in range(0, len(rows), batch_size):
            chunk = rows[s_lo:s_lo + batch_size]
            rest = [groups[g][j][0][prefixes[g]:] for _, g, j in chunk]
            s_width = max(len(x) for x in rest)
            suffix_logits = None
            if s_width:
                s_ids = torch.full((len(chunk), s_width), pad, dtype=torch.long)
                s_attn = torch.zeros((len(chunk), s_width), dtype=torch.long)
                for q, x in enumerate(rest):
                    s_ids[q, :len(x)] = torch.tensor(x, dtype=torch.long)
                    s_attn[q, :len(x)] = 1
                pick = torch.tensor([r for r, _, _ in chunk], device=device)
                for layer, (keys, values) in zip(layers, saved, strict=True):
                    layer.keys, layer.values = keys, values
                cache.batch_select_indices(pick)
                pos = torch.tensor([prefixes[g] for _, g, _ in chunk]).unsqueeze(1) + torch.arange(s_width)
                suffix_logits = model(input_ids=s_ids.to(device), use_cache=True, **{cache_arg: cache},
                                      attention_mask=torch.cat([attn[pick], s_attn.to(device)], 1),
                                      position_ids=pos.to(device)).logits
            sums = [_window_score(*groups[g][j], prefixes[g], last[r],
                                  None if suffix_logits is None else suffix_logits[q])
                    for q, (r, g, j) in enumerate(chunk)]
            for (_, g, j), v in zip(chunk, torch.stack(sums).tolist(), strict=True):
                out[g][j] = v
        del saved, cache, layers
    return out


@dataclass
class TokenScores:
    """Per scored token of one example: log p of the gold token, the mean μ and standard
    deviation σ of log p under the model's own next-token distribution (Min-K%++'s
    normalisers), and whether the gold token is the argmax (greedy) prediction."""

    logp: list[float]
    mu: list[float]
    sigma: list[float]
    hit: list[bool]
    ids: list[int]  # the gold tokens scored


def token_windows(model, windows: list[tuple[list[int], list[int], int]], batch_size: int,
                  pad: int, device: str) -> list[TokenScores]:
    """``TokenScores`` over the last ``n`` positions of each window (x, y, n), in float64."""
    import torch.nn.functional as F

    out: list = [None] * len(windows)
    for i, logits in forward_batches(model, [w[0] for w in windows], batch_size, pad, device):
        x, y, n = windows[i]
        t = len(x)
        lp = F.log_softmax(logits[t - n:t].float(), dim=-1).double()
        tgt = torch.tensor(y[t - n:t], device=lp.device)
        p = lp.exp()
        mu = (p * lp).sum(-1)
        sigma = ((p * lp * lp).sum(-1) - mu * mu).clamp_min(0).sqrt()
        gold_lp = lp.gather(1, tgt.unsqueeze(1)).squeeze(1)
        out[i] = TokenScores(gold_lp.tolist(), mu.tolist(), sigma.tolist(),
                             (lp.argmax(-1) == tgt).tolist(), y[t - n:t])
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


# -- per-example losses: the ``loss`` metric and everything built on it ----------------------
# ``m`` carries the encoding params of ``loss.ScoredText`` (text/prompt/response fields, ...).

def encode_prompt(subject: Subject, prompt: str, chat_template: bool) -> list[int]:
    """A prompt's tokens: the user turn of the tokenizer's chat template (generation prompt
    appended) with ``chat_template``, else the plain encoding with special tokens."""
    tok = subject.need_tokenizer("prompt/response text")
    if chat_template:
        if not getattr(tok, "chat_template", None):
            raise OpError("chat_template: the model's tokenizer has no chat template")
        head = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                       tokenize=True)
        return list(head["input_ids"] if hasattr(head, "keys") else head)
    return list(tok(prompt)["input_ids"])


def encode_prompt_response(subject: Subject, prompt: str, response: str,
                           chat_template: bool) -> tuple[list[int], list[bool]]:
    """(ids, scored): the prompt (unscored) then the response and EOS (scored), as
    finetune/unlearn encode prompt/response records."""
    tok = subject.need_tokenizer("loss on prompt/response text")
    eos = getattr(tok, "eos_token_id", None)
    head = encode_prompt(subject, prompt, chat_template)
    tail = tok(response, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
    return head + tail, [False] * len(head) + [True] * len(tail)


def generate_greedy(subject: Subject, prompts: list[str], max_new_tokens: int, batch_size: int,
                    chat_template: bool) -> list[str]:
    """Greedy answers to ``prompts`` (through the chat template where asked and the tokenizer
    has one), generated in left-padded batches; special tokens are dropped from the text."""
    tok = subject.need_tokenizer("generation")
    use_chat = bool(chat_template and getattr(tok, "chat_template", None))
    encoded = [encode_prompt(subject, p, use_chat) for p in prompts]
    model = subject.model
    pad = models.pad_id(model, tok)
    eos = getattr(tok, "eos_token_id", None)
    answers = []
    for lo in range(0, len(encoded), batch_size):
        chunk = encoded[lo:lo + batch_size]
        width = max(len(x) for x in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for r, x in enumerate(chunk):  # left padding: generation continues from the right end
            ids[r, width - len(x):] = torch.tensor(x)
            attn[r, width - len(x):] = 1
        gen = model.generate(input_ids=ids.to(subject.device), attention_mask=attn.to(subject.device),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                             eos_token_id=eos, temperature=None, top_p=None, top_k=None,
                             use_cache=True)  # models load with use_cache off (training); decoding wants it
        for r in range(len(chunk)):
            answers.append(tok.decode(gen[r, width:], skip_special_tokens=True))
    return answers


def loss_examples(subject: Subject, m, path: Path) -> list[tuple[list[int], list[bool]]]:
    """(ids, scored) per record, encoded as finetune/unlearn encode their data."""
    rows = read_records(path, m.limit)
    vocab = subject.model.get_input_embeddings().num_embeddings
    tok = subject.tokenizer
    eos = getattr(tok, "eos_token_id", None)
    L = min(m.max_length, models.max_positions(subject.model) or m.max_length)
    out = []
    for i, row in enumerate(rows, 1):
        if "input_ids" in row:
            ids = check_ids(path, i, row["input_ids"], vocab)
            scored = [True] * len(ids)
        elif m.prompt_field is not None:
            ids, scored = encode_prompt_response(subject, str(row[m.prompt_field]), str(row[m.response_field]),
                                                 m.chat_template)
        else:
            tok = subject.need_tokenizer("loss on text")
            ids = tok(str(row[m.text_field]))["input_ids"]
            if eos is not None and (not ids or ids[-1] != eos):
                ids = ids + [eos]
            scored = [True] * len(ids)
        out.append((ids[:L], scored[:L]))
    return out


def causal_lls(subject: Subject, m, path: Path, metric: str) -> tuple[list[float], list[int]]:
    """A causal LM's Σ log p over the scored tokens of each example of ``path``, and their
    number (examples with no scored token within ``max_length`` are skipped)."""
    require_causal(subject, metric)
    model = subject.model
    examples = loss_examples(subject, m, path)
    # score exactly the marked targets: split into (x, y, n) with n = scored tail length
    wins, counts = [], []
    for ids, scored in examples:
        x, y = ids[:-1], ids[1:]
        marks = scored[1:]
        if not any(marks):
            continue
        first = marks.index(True)
        if not all(marks[first:]):
            raise OpError(f"{path}: scored tokens must be one contiguous tail")
        wins.append((x, y, len(x) - first))
        counts.append(len(x) - first)
    if not counts:
        raise OpError(f"{path}: no token to score within max_length {m.max_length}")
    lls = score_windows(model, wins, m.batch_size, models.pad_id(model, subject.tokenizer), subject.device)
    return lls, counts


def classifier_batches(subject: Subject, m, path: Path) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """A classifier's (float32 logits, gold label ids) per batch of the records of ``path``."""
    model = subject.model
    rows = read_records(path, m.limit)
    label2id = {str(k): v for k, v in (model.config.label2id or {}).items()}
    tok = subject.need_tokenizer("classifier loss on text")
    for lo in range(0, len(rows), m.batch_size):
        chunk = rows[lo:lo + m.batch_size]
        enc = tok([str(r[m.text_field]) for r in chunk], truncation=True, max_length=m.max_length,
                  padding=True, return_tensors="pt")
        labels = torch.tensor([gold(path, lo + j + 1, r[m.label_field], None, label2id)
                               for j, r in enumerate(chunk)])
        logits = model(**{k: v.to(subject.device) for k, v in enc.items()}).logits.float()
        yield logits, labels.to(logits.device)


def example_losses(subject: Subject, m, path: Path, metric: str) -> list[float]:
    """Each example's loss: mean token NLL (causal LMs), cross-entropy (classifiers)."""
    import torch.nn.functional as F

    if models.is_classifier(subject.model):
        out: list[float] = []
        for logits, labels in classifier_batches(subject, m, path):
            out += F.cross_entropy(logits, labels, reduction="none").tolist()
        return out
    lls, counts = causal_lls(subject, m, path, metric)
    return [-ll / n for ll, n in zip(lls, counts, strict=True)]
