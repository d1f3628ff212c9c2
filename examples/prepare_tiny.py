"""Build the tiny models the quickstart merges: a base Llama and two "fine-tunes".

The fine-tunes are the base plus small structured changes (each one nudges a
different half of the layers), standing in for real fine-tunes until the
real-model quickstart lands.  Written as safetensors directories under
``examples/models/`` (git-ignored); rerunning is a no-op when they exist.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIG = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=512, max_position_embeddings=256)


def main(out: Path = HERE / "models") -> None:
    import torch
    import transformers
    from safetensors.torch import load_file, save_file

    if all((out / n / "model.safetensors").is_file() for n in ("base", "math", "code")):
        print(f"tiny models already in {out}")
        return
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG))
    base.save_pretrained(out / "base")
    weights = load_file(out / "base" / "model.safetensors")
    for i, (name, layers) in enumerate({"math": range(0, 2), "code": range(2, 4)}.items()):
        g = torch.Generator().manual_seed(100 + i)
        changed = {}
        for n, t in weights.items():
            touched = any(f"layers.{l}." in n for l in layers)
            scale = 0.05 if touched else 0.005
            changed[n] = t + scale * torch.randn(t.shape, generator=g) if t.is_floating_point() else t
        (out / name).mkdir(parents=True, exist_ok=True)
        save_file(changed, out / name / "model.safetensors", metadata={"format": "pt"})
        (out / name / "config.json").write_text((out / "base" / "config.json").read_text())
    print(f"wrote tiny models to {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "models")
