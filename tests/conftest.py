"""Shared fixtures: tiny random models saved as safetensors directories, and helpers
to write and run pipelines against a throw-away store."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

TINY_LLAMA = {
    "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256,
    "max_position_embeddings": 128,
}


def save_tiny_llama(path: Path, seed: int = 0, config: dict | None = None) -> Path:
    """A randomly initialised tiny Llama saved as a Hugging Face directory."""
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    cfg = dict(config or TINY_LLAMA)
    model_type = cfg.pop("model_type")
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(model_type, **cfg))
    model.save_pretrained(path)
    return path


def perturbed_copy(src: Path, dst: Path, seed: int, scale: float = 0.02) -> Path:
    """``src`` plus Gaussian noise on every float tensor: a stand-in for a fine-tune."""
    import torch
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tensors = load_file(src / "model.safetensors")
    out = {n: (t + scale * torch.randn(t.shape, generator=g)) if t.is_floating_point() else t
           for n, t in tensors.items()}
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    for f in src.glob("*.json"):
        (dst / f.name).write_text(f.read_text())
    return dst


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """base + two perturbed copies (ft_a, ft_b), plus an 'other' base of the same shape."""
    root = tmp_path_factory.mktemp("models")
    base = save_tiny_llama(root / "base", seed=0)
    return {
        "base": base,
        "ft_a": perturbed_copy(base, root / "ft_a", seed=1),
        "ft_b": perturbed_copy(base, root / "ft_b", seed=2),
        "other": save_tiny_llama(root / "other", seed=3),
    }


@pytest.fixture
def store_dir(tmp_path) -> Path:
    return tmp_path / "cache"


def write_pipeline(directory: Path, text: str, name: str = "pipeline.yaml") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def run(path: Path, store_dir: Path, **kwargs):
    """Run a pipeline file in-process; returns (outcome, {step: status})."""
    from weightflow.dsl.engine.runner import Runner
    from weightflow.dsl.lang.pipeline import load_pipeline
    from weightflow.dsl.store.content import Store

    logs: list[str] = []
    outcome = Runner(load_pipeline(path), Store(store_dir), log=logs.append, **kwargs).run()
    outcome.logs = logs
    return outcome, {s.name: s.status for s in outcome.steps}


def read_model(directory: Path) -> dict:
    """Every tensor of an artifact directory, dense (sparse deltas are decoded)."""
    from weightflow.ops.lib.tensors import Checkpoint

    ck = Checkpoint(directory)
    out = {n: ck.get(n).clone() for n in ck.names()}
    ck.close()
    return out


def lock_of(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.with_suffix(".lock").read_text())["steps"]


def config_of(directory: Path) -> dict:
    return json.loads((Path(directory) / "config.json").read_text())
