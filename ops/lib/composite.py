"""Composite models: a rule over stored models, stored and scored like a model.

Some unlearning systems do not produce one set of weights.  ULD subtracts an assistant's
logits from the target's; S3T answers with an ensemble of shard models; ECO puts a prompt
classifier in front of the model and corrupts the embeddings of the prompts it flags.  A
**Composite** artifact (``Kind.COMPOSITE``) holds such a rule: a ``composite.json`` naming the
rule, its parameters and its components, and each component model in a subdirectory of its
own (safetensors and config, as any stored model), so the artifact is self-contained: its
digest covers every component, ``export`` copies it as it is, and loading needs nothing else.

``composite.json``::

    {"format": "weightflow-composite", "version": 1, "rule": "contrast",
     "params": {"alpha": 0.8, "top_logit_filter": 0.01},
     "components": {"target": "target", "assistant": "assistant"},
     "primary": "target"}

The ``primary`` component gives the composite its tokenizer, config and vocabulary.

Loading (``load``; ``weightflow.load_model(DIR)``) builds a torch module from weightflow's own
code: nothing in the directory is executed, and ``composite.json`` is data (a rule name from
``RULES`` and numbers).  The module has what the metrics use of a transformers model:
``forward(input_ids, attention_mask) -> .logits``, ``generate`` (greedy), ``config`` and
``get_input_embeddings``; its class name ends in ``ForCausalLM`` (or
``ForSequenceClassification`` for an ensemble of classifiers), so it is scored with every
metric that needs only forward passes or generation.

Each rule is one ``Rule`` declaration below: its components, its params, and how it combines
the components' outputs.  The returned "logits" are log-probabilities (log-softmax), which
every consumer treats as logits (softmax and argmax are unchanged by the normalisation).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from weightflow.dsl.lang.diagnostics import OpError

FILE = "composite.json"
FORMAT = "weightflow-composite"
VERSION = 1


@dataclass(frozen=True)
class Rule:
    """One composite rule: the component roles it needs and how it combines them."""

    name: str
    roles: tuple[str, ...]           # fixed roles ("target", "assistant"), or () for a list (ensemble)
    params: Mapping[str, Any]        # its params and their defaults
    doc: str


RULES: dict[str, Rule] = {
    "contrast": Rule("contrast", ("target", "assistant"), {"alpha": 1.0, "top_logit_filter": 0.0,
                                                           "min_kept_fraction": 0.0, "preserve_mass": False},
                     "log p = log_softmax(lp_target − alpha·lp_assistant) on the tokens whose target probability "
                     "is at least top_logit_filter × the most likely token's, or that are among the "
                     "int(min_kept_fraction × V) most likely (ULD's relative-top filter keeps at least "
                     "int(top_logit_filter × V)); the other tokens keep the target's log-probability, so "
                     "unlikely tokens are never boosted; preserve_mass: the kept tokens share the target's "
                     "probability of the kept set, p(v) = p_T(K)·softmax_K(lp_target − alpha·lp_assistant)(v), "
                     "so a flat assistant leaves the target's distribution exactly as it is"),
    "ensemble": Rule("ensemble", (), {"aggregate": "mean_probs"},
                     "the members' next-token (or class) distributions averaged: mean_probs = log of the mean "
                     "of the probabilities, mean_logprobs = the mean of the log-probabilities"),
    "guarded": Rule("guarded", ("target", "classifier"), {"threshold": 0.5, "strength": 1.0, "seed": 0,
                                                           "forget_label": 1},
                    "the classifier reads each input's text; where P(forget_label) ≥ threshold, the target "
                    "runs on its input embeddings plus Gaussian noise of strength × the embedding matrix's "
                    "standard deviation (seeded per input), else on the input unchanged (ECO)"),
    "s3t": Rule("s3t", ("base", "adapters"), {"aggregate": "mean_probs"},
                "S3T's shards: per shard, the base plus the still-active LoRA adapters of its chosen slice "
                "sequence (merged), the shards' distributions averaged (mean_probs); see ops/lib/s3t.py"),
}


def is_composite(path: Path) -> bool:
    return (Path(path) / FILE).is_file()


def read_spec(path: Path) -> dict:
    """``composite.json``, checked: a known format, rule and components that exist."""
    path = Path(path)
    try:
        spec = json.loads((path / FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise OpError(f"{path / FILE}: not a readable composite description ({exc})") from None
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        raise OpError(f"{path / FILE}: not a weightflow composite (format {spec.get('format')!r})")
    if spec.get("version") != VERSION:
        raise OpError(f"{path / FILE}: composite version {spec.get('version')!r}; this weightflow reads {VERSION}")
    rule = RULES.get(spec.get("rule"))
    if rule is None:
        raise OpError(f"{path / FILE}: unknown rule {spec.get('rule')!r}; the rules: {', '.join(RULES)}")
    comps = spec.get("components")
    if not isinstance(comps, dict) or not comps:
        raise OpError(f"{path / FILE}: 'components' must map roles to subdirectories")
    for role, sub in comps.items():
        if not isinstance(sub, str) or "/" in sub or sub.startswith(".") or not (path / sub).is_dir():
            raise OpError(f"{path / FILE}: component '{role}' is not a subdirectory of the composite ({sub!r})")
    if rule.roles and set(comps) != set(rule.roles):
        raise OpError(f"{path / FILE}: rule '{rule.name}' needs components {', '.join(rule.roles)}")
    if spec.get("primary") not in comps:
        raise OpError(f"{path / FILE}: 'primary' must name one of the components")
    return spec


def primary_dir(path: Path) -> Path:
    """The directory of the component that gives the composite its tokenizer and config."""
    spec = read_spec(path)
    return Path(path) / spec["components"][spec["primary"]]


# -- writing ---------------------------------------------------------------------------------

def _link_or_copy(src: Path, dst: Path) -> None:
    """Stored files are immutable: a hard link shares them; another filesystem gets a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def add_component(out: Path, name: str, model_dir: Path) -> str:
    """Place a stored model as component ``name`` of the composite being written in ``out``."""
    dst = Path(out) / name
    dst.mkdir(parents=True, exist_ok=False)
    for f in sorted(Path(model_dir).iterdir()):
        if f.is_file() and f.name != "weightflow.json":
            _link_or_copy(f, dst / f.name)
    return name


def write_spec(out: Path, rule: str, params: dict, components: dict[str, str], primary: str) -> dict:
    spec = {"format": FORMAT, "version": VERSION, "rule": rule, "params": params, "components": components,
            "primary": primary}
    (Path(out) / FILE).write_text(json.dumps(spec, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    read_spec(out)
    return spec


# -- loading ---------------------------------------------------------------------------------

def load(path: Path, device: str = "cpu"):
    """The composite in ``path`` as a torch module (see the module docstring)."""
    from weightflow.ops.lib import models

    spec = read_spec(path)
    if spec["rule"] == "s3t":  # its components are a base and adapter files, not models
        from weightflow.ops.lib import s3t

        return s3t.load(Path(path), spec, device)
    comps = {role: models.load_model(Path(path) / sub, device) for role, sub in spec["components"].items()}
    rule = RULES[spec["rule"]]
    params = {**rule.params, **(spec.get("params") or {})}
    tokenizers: dict[str, Any] = {}
    if spec["rule"] == "guarded":
        tokenizers = {role: models.load_tokenizer(Path(path) / sub, required="a guarded composite")
                      for role, sub in spec["components"].items()}
    return _module(spec, comps, params, tokenizers)


def _module(spec: dict, comps: dict, params: dict, tokenizers: dict):
    import torch

    primary = comps[spec["primary"]]
    classifier = all(type(m).__name__.endswith("ForSequenceClassification") for m in comps.values())
    causal = all(_causal(m) for m in comps.values()) or spec["rule"] == "guarded" and _causal(comps["target"])
    if spec["rule"] in ("ensemble", "s3t") and not (classifier or causal):
        raise OpError("an ensemble's members must all be causal LMs or all sequence classifiers")
    if spec["rule"] in ("contrast", "guarded") and not _causal(comps["target"]):
        raise OpError(f"a {spec['rule']} composite's target must be a causal LM")
    if spec["rule"] in ("contrast", "ensemble", "s3t"):
        sizes = {role: _out_size(m) for role, m in comps.items()}
        if len(set(sizes.values())) > 1:
            raise OpError(f"a {spec['rule']} composite's components must share one vocabulary (or label set); "
                          "sizes: " + ", ".join(f"{r} {n}" for r, n in sizes.items()))
    combine: Callable = {"contrast": _contrast, "ensemble": _ensemble, "guarded": _guarded,
                         "s3t": _ensemble}[spec["rule"]]

    class Composite(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.parts = torch.nn.ModuleDict(comps)
            self.config = primary.config
            self.rule, self.params, self.spec, self.tokenizers = spec["rule"], params, spec, tokenizers

        def get_input_embeddings(self):
            return primary.get_input_embeddings()

        def forward(self, input_ids=None, attention_mask=None, position_ids=None, **_ignored):
            from transformers.modeling_outputs import SequenceClassifierOutput

            logits = combine(self, input_ids, attention_mask, position_ids)
            return SequenceClassifierOutput(logits=logits)

        @torch.inference_mode()
        def generate(self, input_ids=None, attention_mask=None, max_new_tokens: int = 20, pad_token_id=None,
                     eos_token_id=None, **_ignored):
            """Greedy decoding over the combined next-token distribution, left padding honoured
            (positions from the attention mask, as transformers computes them)."""
            ids = input_ids
            mask = attention_mask if attention_mask is not None else torch.ones_like(ids)
            done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
            pad = pad_token_id if pad_token_id is not None else 0
            eos = set(eos_token_id if isinstance(eos_token_id, list) else [eos_token_id]) - {None}
            extra = {"prompt_len": input_ids.shape[1]} if self.rule == "guarded" else {}
            for _ in range(max_new_tokens):
                pos = (mask.long().cumsum(-1) - 1).clamp_min(0)
                nxt = combine(self, ids, mask, pos, **extra)[:, -1].argmax(-1)
                nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
                ids = torch.cat([ids, nxt[:, None]], dim=1)
                mask = torch.cat([mask, (~done).long()[:, None]], dim=1)
                if eos:
                    done = done | torch.isin(nxt, torch.tensor(sorted(eos), device=nxt.device))
                if bool(done.all()):
                    break
            return ids

    suffix = "ForSequenceClassification" if classifier and spec["rule"] in ("ensemble", "s3t") else "ForCausalLM"
    Composite.__name__ = Composite.__qualname__ = f"{spec['rule'].capitalize()}Composite{suffix}"
    return Composite().eval()


def _out_size(m) -> int:
    """A component's output width: its vocabulary (causal LM) or its number of labels."""
    if type(m).__name__.endswith("ForSequenceClassification"):
        return int(m.config.num_labels)
    return int(m.get_output_embeddings().weight.shape[0])


def _causal(m) -> bool:
    from weightflow.ops.lib import models

    return models.is_causal_lm(m)


def _logprobs(model, ids, mask, pos, embeds=None):
    import torch

    kwargs = {"attention_mask": mask}
    if pos is not None:
        kwargs["position_ids"] = pos
    out = model(inputs_embeds=embeds, **kwargs) if embeds is not None else model(input_ids=ids, **kwargs)
    return torch.log_softmax(out.logits.float(), dim=-1)


def _contrast(self, ids, mask, pos):
    import math

    import torch

    lp_t = _logprobs(self.parts["target"], ids, mask, pos)
    lp_a = _logprobs(self.parts["assistant"], ids, mask, pos)
    alpha, f = float(self.params["alpha"]), float(self.params["top_logit_filter"])
    mixed = lp_t - alpha * lp_a
    if f > 0:
        thresh = lp_t.max(dim=-1, keepdim=True).values + math.log(f)
        k = int(float(self.params.get("min_kept_fraction", 0.0)) * lp_t.shape[-1])
        if k >= 1:  # the k-th most likely token's log-probability, if lower
            thresh = torch.minimum(thresh, lp_t.topk(k, dim=-1).values[..., -1:])
        keep = lp_t >= thresh
        if self.params.get("preserve_mass"):
            mass = torch.logsumexp(lp_t.masked_fill(~keep, -math.inf), dim=-1, keepdim=True)
            inner = torch.log_softmax(mixed.masked_fill(~keep, -math.inf), dim=-1)
            return torch.where(keep, inner + mass, lp_t)
        mixed = torch.where(keep, mixed, lp_t)
    return torch.log_softmax(mixed, dim=-1)


def _ensemble(self, ids, mask, pos):
    import math

    import torch

    lps = [_logprobs(m, ids, mask, pos) for m in self.parts.values()]
    if self.params["aggregate"] == "mean_logprobs":
        return torch.log_softmax(torch.stack(lps).mean(0), dim=-1)
    return torch.logsumexp(torch.stack(lps), dim=0) - math.log(len(lps))


def _guarded(self, ids, mask, pos, prompt_len: int | None = None):
    """ECO: flag inputs by the classifier, corrupt the flagged ones' prompt embeddings.

    The prompt is the first ``prompt_len`` positions (in ``generate``: the input given; in a
    scoring forward pass: the whole input).  The noise of a flagged row (``prompt_noise``) is
    drawn from a generator seeded by the rule's ``seed`` and the row's prompt tokens, so one
    prompt is corrupted the same way at every step of generation and on every machine.
    ECO's ``rand_noise_first_n`` with every embedding dimension, its noise std σ =
    strength × the embedding matrix's std (ECO leaves a prompt's last token as it is; here
    every prompt token is corrupted)."""
    import torch

    target, clf = self.parts["target"], self.parts["classifier"]
    tok_t, tok_c = self.tokenizers["target"], self.tokenizers["classifier"]
    width = ids.shape[1] if prompt_len is None else prompt_len
    mask_ = mask if mask is not None else torch.ones_like(ids)
    prompts = [row[:width][m[:width].bool()] for row, m in zip(ids, mask_, strict=True)]
    texts = [tok_t.decode(p, skip_special_tokens=True) for p in prompts]
    enc = tok_c(texts, truncation=True, padding=True, return_tensors="pt")
    probs = torch.softmax(clf(**{k: v.to(ids.device) for k, v in enc.items()}).logits.float(), dim=-1)
    flagged = probs[:, int(self.params["forget_label"])] >= float(self.params["threshold"])
    emb_layer = target.get_input_embeddings()
    embeds = emb_layer(ids)
    if bool(flagged.any()):
        scale = float(self.params["strength"]) * float(emb_layer.weight.float().std())
        noise = prompt_noise(ids, mask_, width, int(self.params["seed"]), embeds.shape[-1], rows=flagged)
        embeds = embeds + scale * noise.to(embeds)
    self.last_flagged = flagged
    return _logprobs(target, ids, mask, pos, embeds=embeds)


def prompt_noise(ids, mask, width: int, seed: int, dim: int, rows=None):
    """The guarded rule's unscaled noise [B, T, dim]: standard Gaussian on the prompt's tokens
    (the attended positions among the first ``width``), zero elsewhere and on rows not in
    ``rows`` (a bool mask; None: every row).  A row's noise is drawn from a generator seeded
    by ``seed`` and its prompt tokens, one vector per token in order, so a prompt is
    corrupted the same way whatever the batch, its padding or the step of generation."""
    import hashlib

    import torch

    noise = torch.zeros((*ids.shape, dim))
    for r in range(ids.shape[0]):
        if rows is not None and not rows[r]:
            continue
        at = mask[r, :width].bool().nonzero().flatten().cpu()
        tokens = ids[r, :width][at.to(ids.device)]
        h = hashlib.sha256(f"{seed}:{tokens.tolist()}".encode()).digest()
        g = torch.Generator().manual_seed(int.from_bytes(h[:8], "little"))
        noise[r, at] = torch.randn((len(at), dim), generator=g)
    return noise.to(ids.device)
