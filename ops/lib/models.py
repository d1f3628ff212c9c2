"""Whole models for the ops that need one (prune-wanda, evaluate): load, find blocks, save.

Imported only inside ``run`` (it imports torch).  A stored Model artifact is a normal
Hugging Face directory; it is instantiated with the class its config names
(``architectures[0]``), so a classifier stays a classifier and a causal LM keeps its
head.  The transformer blocks of Llama-, GPT-2- and BERT-family models are found
generically: the ``ModuleList`` holding ``num_hidden_layers`` modules.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from weightflow.dsl.lang.diagnostics import OpError

# Files of a model directory that describe the weights; everything else in
# SIDE_FILE_GLOBS (tokenizer, chat template) travels along with a produced model.
WEIGHT_SIDE_FILES = {"config.json", "generation_config.json"}


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Transformers' logging at errors only and its progress bars off for the block, then
    both put back as they were (they are process-wide: a library caller's settings stay)."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def architectures(model_dir: Path) -> list[str]:
    try:
        return json.loads((Path(model_dir) / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError):
        raise OpError(f"{model_dir} has no readable config.json") from None


def _why(exc: Exception) -> str:
    text = str(exc).strip()
    if "custom code" in text:
        return ("it needs the model's own Python code (an auto_map in its config), which weightflow "
                "runs only for a load step with trust_remote_code: true")
    return f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}"


def load_model(model_dir: Path, device: str = "cpu"):
    """The stored model in float32, in eval mode, as the class its config names.

    Never runs code from the model directory (trust_remote_code=False) and never hands back
    a partly random model: a tensor the architecture has but the files lack is an error.
    """
    import transformers

    from weightflow.ops.lib import composite

    if composite.is_composite(model_dir):  # a rule over stored models (weightflow's own code)
        return composite.load(model_dir, device)
    archs = architectures(model_dir)
    cls = getattr(transformers, archs[0], None) if archs else None
    try:
        with quiet_transformers():
            if cls is None or not hasattr(cls, "from_pretrained"):
                config = transformers.AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
                try:
                    transformers.AutoModelForCausalLM._model_mapping[type(config)]
                    cls = transformers.AutoModelForCausalLM
                except KeyError:
                    cls = transformers.AutoModel
            model, info = cls.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True,
                                              trust_remote_code=False, output_loading_info=True)
    except Exception as exc:
        raise OpError(f"cannot instantiate the model in {model_dir} ({_why(exc)})") from None
    check_loaded(model, info, None, f"the model in {model_dir}", new_head=False, check_unexpected=False)
    model.eval()
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False
    return model.to(device)


# Checkpoint tensors transformers derives rather than loads (old persistent buffers).
_DERIVED = re.compile(r"(^|\.)position_ids$|rotary_emb\.inv_freq$")


@dataclass(frozen=True)
class _Naming:
    """How ``check_loaded`` finds a model tensor's name in the files, and says where it is."""

    ckpt: Any
    label: str
    prefix: str
    has_head: bool
    files: frozenset[str]

    def in_head(self, key: str) -> bool:
        return self.has_head and not key.startswith(self.prefix + ".")

    def file_key(self, key: str) -> str | None:
        """The file's name for model tensor ``key`` (with or without the base-model prefix)."""
        prefix = self.prefix
        cands = [key]
        if prefix:
            cands.append(key[len(prefix) + 1:] if key.startswith(prefix + ".") else f"{prefix}.{key}")
        for c in list(cands):  # LayerNorm's old names
            if c.endswith(".weight"):
                cands.append(c[: -len("weight")] + "gamma")
            elif c.endswith(".bias"):
                cands.append(c[: -len("bias")] + "beta")
        return next((c for c in cands if c in self.files), None)

    def where(self, name: str | None) -> str:
        if self.ckpt is not None and name in self.files:
            return f"in {self.ckpt.file_of(name).name} of {self.label}"
        return f"in {self.label}"


def _desc(t) -> str:
    return f"{str(t.dtype).removeprefix('torch.')} {list(t.shape)}"


def check_loaded(model, info: dict, ckpt, label: str, new_head: bool, compare_values: bool = False,
                 check_unexpected: bool = True) -> dict:
    """Check that transformers filled ``model`` from the files, not from its random init.

    ``info`` is ``from_pretrained(..., output_loading_info=True)``'s report and ``ckpt`` the
    files' ``Checkpoint`` (None: no per-file checks).  Every tensor the model has must have
    been loaded, with its shape; only a new head -- tensors outside the base model, when
    ``new_head`` -- may be missing (it is initialised).  Tensors the files hold that the model
    does not use are errors, except the old head that a new one replaces (dropped) and
    derived buffers.  Tensors the model took from the files under a name we can tell are
    also checked for the kind of dtype (float where a float is expected) and, with
    ``compare_values``, for holding exactly the file's values converted to the model's
    dtype.  Returns {"initialised": [names], "dropped": [names]}; raises OpError naming the
    file and the tensor otherwise.
    """
    arch = type(model).__name__
    prefix = getattr(model, "base_model_prefix", "") or ""
    base = getattr(model, prefix, None) if prefix else None
    has_head = isinstance(base, torch.nn.Module) and base is not model
    files = set(ckpt.names()) if ckpt is not None else set()
    file_prefixed = bool(prefix) and any(n.startswith(prefix + ".") for n in files)
    naming = _Naming(ckpt, label, prefix, has_head, frozenset(files))

    state = model.state_dict(keep_vars=True)
    problems: list[str] = []
    for msg in info.get("error_msgs") or []:
        problems.append(str(msg).strip().splitlines()[0][:300])
    mismatched = set()
    for key, stored, expected in info.get("mismatched_keys") or []:
        mismatched.add(key)
        fk = naming.file_key(key) or key
        problems.append(f"tensor '{fk}' {naming.where(fk)} has shape {list(stored)}; {arch} expects {list(expected)}")
    initialised = []
    for key in sorted(set(info.get("missing_keys") or []) - mismatched):
        if new_head and naming.in_head(key):
            initialised.append(key)
        else:
            t = state.get(key)
            problems.append(f"tensor '{key}'{f' ({_desc(t)})' if t is not None else ''} of {arch} is in no "
                            f"file of {label}; it would be randomly initialised")
    dropped = []
    for key in sorted(info.get("unexpected_keys") or []):
        if _DERIVED.search(key) or not check_unexpected:
            continue
        if new_head and file_prefixed and not key.startswith(prefix + "."):
            dropped.append(key)  # the old head, replaced by the new one
        else:
            problems.append(f"tensor '{key}' {naming.where(key)} is not part of {arch}")
    if ckpt is not None and not problems:
        problems += _file_problems(state, naming, set(initialised) | mismatched, arch, compare_values)
    if problems:
        more = f"; and {len(problems) - 6} more" if len(problems) > 6 else ""
        raise OpError(f"{label} does not fit {arch}: " + "; ".join(problems[:6]) + more)
    return {"initialised": initialised, "dropped": dropped}


def _file_problems(state: dict, naming: _Naming, skip: set[str], arch: str, compare_values: bool) -> list[str]:
    """``check_loaded``'s per-file checks of the tensors the model took from the files."""
    from weightflow.ops.lib.tensors import FLOAT_ST

    ckpt, where = naming.ckpt, naming.where
    problems: list[str] = []
    for key, t in state.items():
        fk = None if key in skip else naming.file_key(key)
        if fk is None:  # initialised, tied to another tensor, or converted by transformers
            continue
        stored = ckpt.info[fk]
        if tuple(stored.shape) != tuple(t.shape):
            problems.append(f"tensor '{fk}' {where(fk)} has shape {list(stored.shape)}; {arch} expects "
                            f"{list(t.shape)}")
        elif t.is_floating_point() != (stored.dtype in FLOAT_ST):
            kind = "a floating-point" if t.is_floating_point() else f"a {str(t.dtype).removeprefix('torch.')}"
            problems.append(f"tensor '{fk}' {where(fk)} is {stored.dtype}; {arch} expects {kind} tensor "
                            "there")
        elif compare_values and t.device.type != "meta":
            want = ckpt.get(fk).to(t.dtype)
            got = t.detach()
            same = torch.equal(got, want) or (t.is_floating_point() and
                                              bool(((got == want) | (got.isnan() & want.isnan())).all()))
            if not same:
                problems.append(f"tensor '{fk}' {where(fk)} is not what {arch} holds after loading "
                                "(its values differ)")
    return problems


def is_causal_lm(model) -> bool:
    return type(model).__name__.endswith("ForCausalLM") or type(model).__name__.endswith("LMHeadModel")


def is_classifier(model) -> bool:
    return type(model).__name__.endswith("ForSequenceClassification")


def load_tokenizer(model_dir: Path, required: str | None = None):
    """The model's tokenizer; None when its directory has none (unless ``required`` says why
    one is needed, then a clear error)."""
    import transformers

    from weightflow.ops.lib import composite

    if composite.is_composite(model_dir):
        model_dir = composite.primary_dir(model_dir)
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model")
    tok = None
    if any((Path(model_dir) / f).is_file() for f in names):
        try:
            tok = transformers.AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
        except Exception as exc:
            if required:
                raise OpError(f"{required} needs the model's tokenizer, and it does not load "
                              f"({_why(exc)})") from None
    if tok is None and required:
        raise OpError(f"{required} needs the model's tokenizer, and the model has none; give "
                      "pre-tokenized data (.jsonl with input_ids) instead")
    return tok


def max_positions(model) -> int | None:
    """The model's context length from its config (lm-evaluation-harness's order)."""
    cfg = model.config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def pad_id(model, tokenizer=None) -> int:
    """A token id for padding (its positions are masked out, so any id in the vocabulary does)."""
    vocab = model.get_input_embeddings().num_embeddings
    for v in (getattr(tokenizer, "pad_token_id", None), getattr(model.config, "pad_token_id", None),
              getattr(tokenizer, "eos_token_id", None), getattr(model.config, "eos_token_id", None)):
        if isinstance(v, list) and v:
            v = v[0]
        if isinstance(v, int) and 0 <= v < vocab:
            return v
    return 0


def blocks(model) -> tuple[str, torch.nn.ModuleList]:
    """(qualified name, ModuleList) of the model's transformer blocks."""
    n = getattr(model.config, "num_hidden_layers", None)
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) == n and n and \
                any(linear_modules(b) for b in mod):
            return name, mod
    raise OpError(f"cannot find the transformer blocks of {type(model).__name__} (a ModuleList of "
                  f"num_hidden_layers={n} modules); prune-wanda supports Llama-, GPT-2- and "
                  "BERT-family models")


def linear_modules(module) -> dict[str, torch.nn.Module]:
    """Every nn.Linear (and GPT-2's transposed Conv1D) inside ``module``, by qualified name."""
    from transformers.pytorch_utils import Conv1D

    return {n: m for n, m in module.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))}


def weight_rows(module) -> torch.Tensor:
    """The weight as [out, in] (a view: GPT-2's Conv1D stores it transposed)."""
    return module.weight.data if isinstance(module, torch.nn.Linear) else module.weight.data.t()


def save_model(model, src: Path, ctx, dtype: str) -> dict:
    """Save ``model`` (plus the input directory's tokenizer files) into the store.

    The tensors go straight from memory into the store's writer, under the names and in the
    order ``save_pretrained`` gives them (its tied-weight removal and reverse weight
    conversion, one file sorted by name): the same bytes as saving with ``save_pretrained``
    and importing that directory, which is what this did before, without writing and reading
    the weights a second time.  Where transformers lacks those helpers, or the model is over
    one ``save_pretrained`` shard, it does exactly that.
    """
    from weightflow.ops.lib.tensors import side_files
    from weightflow.ops.load import import_directory

    state = saved_state(model)
    with tempfile.TemporaryDirectory(dir=ctx.out.parent) as tmp:
        if state is None:
            model.save_pretrained(tmp, safe_serialization=True)
        else:
            save_config_files(model, Path(tmp))
        for f in side_files(Path(src)):
            if f.name not in WEIGHT_SIDE_FILES and not (Path(tmp) / f.name).exists():
                shutil.copyfile(f, Path(tmp) / f.name)
        if state is None:
            return import_directory(Path(tmp), ctx, dtype)
        return write_state(state, Path(tmp), ctx, dtype)


SAVE_PRETRAINED_SHARD_BYTES = 50 * 10**9  # transformers 5's default max_shard_size, "50GB"


def saved_state(model) -> dict[str, torch.Tensor] | None:
    """The tensors ``model.save_pretrained`` would write, by name, sorted as in its file;
    None where that cannot be reproduced here (older transformers, or several shards)."""
    try:
        from transformers.modeling_utils import remove_tied_weights_from_state_dict, revert_weight_conversion
    except ImportError:
        return None
    if getattr(model, "hf_quantizer", None) is not None or getattr(model, "_hf_peft_config_loaded", False):
        return None
    state = model.state_dict()
    for key in getattr(model, "_keys_to_ignore_on_save", None) or ():
        state.pop(key, None)
    state = remove_tied_weights_from_state_dict(state, model)
    state = revert_weight_conversion(model, state)
    if sum(t.numel() * t.element_size() for t in state.values()) > SAVE_PRETRAINED_SHARD_BYTES:
        return None
    return {name: state[name] for name in sorted(state)}


def save_config_files(model, out: Path) -> None:
    """config.json (with the class as its architecture) and generation_config.json, as
    ``save_pretrained`` writes them."""
    model.config.dtype = str(model.dtype).split(".")[1]
    model.config.architectures = [model.__class__.__name__]
    model.config.save_pretrained(out)
    if model.can_generate() and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)


def write_state(state: dict[str, torch.Tensor], side: Path, ctx, dtype: str) -> dict:
    """Write ``state`` into ``ctx.out`` as ``import_directory`` imports a saved model (the
    same writer, reading rows from memory instead of files)."""
    from weightflow.ops.lib.tensors import TORCH_TO_ST, TensorInfo
    from weightflow.ops.load import write_model

    infos = {n: TensorInfo(n, TORCH_TO_ST[t.dtype], tuple(t.shape)) for n, t in state.items()}

    def read(name: str, lo, hi) -> torch.Tensor:
        t = state[name].detach()
        return t if lo is None else t[lo:hi]

    return write_model(infos, read, side, ctx, dtype, "save")
