"""Whole models for the ops that need one (prune-wanda, evaluate): load, find blocks, save.

Imported only inside ``run`` (it imports torch).  A stored Model artifact is a normal
Hugging Face directory; it is instantiated with the class its config names
(``architectures[0]``), so a classifier stays a classifier and a causal LM keeps its
head.  The transformer blocks of Llama-, GPT-2- and BERT-family models are found
generically: the ``ModuleList`` holding ``num_hidden_layers`` modules.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from weightflow.dsl.diagnostics import OpError

# Files of a model directory that describe the weights; everything else in
# SIDE_FILE_GLOBS (tokenizer, chat template) travels along with a produced model.
WEIGHT_SIDE_FILES = {"config.json", "generation_config.json"}


def architectures(model_dir: Path) -> list[str]:
    try:
        return json.loads((Path(model_dir) / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError):
        raise OpError(f"{model_dir} has no readable config.json") from None


def load_model(model_dir: Path, device: str = "cpu"):
    """The stored model in float32, in eval mode, as the class its config names."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    archs = architectures(model_dir)
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None or not hasattr(cls, "from_pretrained"):
        config = transformers.AutoConfig.from_pretrained(model_dir)
        try:
            transformers.AutoModelForCausalLM._model_mapping[type(config)]
            cls = transformers.AutoModelForCausalLM
        except KeyError:
            cls = transformers.AutoModel
    try:
        model = cls.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True)
    except Exception as exc:
        raise OpError(f"cannot instantiate the model in {model_dir} "
                      f"({type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''})") from None
    model.eval()
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False
    return model.to(device)


def is_causal_lm(model) -> bool:
    return type(model).__name__.endswith("ForCausalLM") or type(model).__name__.endswith("LMHeadModel")


def is_classifier(model) -> bool:
    return type(model).__name__.endswith("ForSequenceClassification")


def load_tokenizer(model_dir: Path, required: str | None = None):
    """The model's tokenizer; None when its directory has none (unless ``required`` says why
    one is needed, then a clear error)."""
    import transformers

    names = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model")
    tok = None
    if any((Path(model_dir) / f).is_file() for f in names):
        try:
            tok = transformers.AutoTokenizer.from_pretrained(model_dir)
        except Exception as exc:
            if required:
                raise OpError(f"{required} needs the model's tokenizer, and it does not load ({exc})") from None
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
    """Save ``model`` (plus the input directory's tokenizer files) and import it into the store."""
    from weightflow.ops._tensors import side_files
    from weightflow.ops.load import import_directory

    with tempfile.TemporaryDirectory(dir=ctx.out.parent) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        for f in side_files(Path(src)):
            if f.name not in WEIGHT_SIDE_FILES and not (Path(tmp) / f.name).exists():
                shutil.copyfile(f, Path(tmp) / f.name)
        return import_directory(Path(tmp), ctx, dtype)
