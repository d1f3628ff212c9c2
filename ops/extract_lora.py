"""``extract-lora``: a delta as LoRA factors, ``Δ ≈ B·A``, by a truncated SVD per tensor.

Each 2-D tensor the ``include``/``exclude`` globs select (Linear weights, embeddings, a
classifier head) is factored: with ``Δ = U·diag(σ)·Vᵀ``, ``B = U_r·diag(√σ_r)`` and
``A = diag(√σ_r)·V_rᵀ``, the best rank-r approximation in the Frobenius norm
(Eckart–Young).  The rank of each tensor is ``rank``, or the smallest r with
``σ_{r+1} ≤ sv_threshold`` (every σᵢ above it kept, as mergekit-extract-lora's
``--sv-epsilon``), or the smallest r keeping ``energy`` of ``‖Δ‖_F² = Σσᵢ²``; with
``sv_threshold`` or ``energy``, ``rank`` caps r.  r never exceeds ``min(out, in)``, where
the factors reproduce the delta up to float32 rounding.

``randomized``: a randomized SVD (``torch.svd_lowrank``, Halko et al.: 10 extra columns,
4 power iterations) instead of the exact one, seeded per (seed, delta, tensor), so
deterministic.  ``auto`` uses it when ``rank`` is given and the matrix is big
(``min(out, in) ≥ 1024`` and ``rank + 10 ≤ min(out, in)/2``); it needs ``rank``.  The
exact SVD runs in float64.

The factors are stored as float32 ``W::lora_A``/``W::lora_B`` (``dsl/format/lowrank.py``)
and every later op reads the tensor as the dense ``B@A``.  Tensors not factored (1-D
biases and norms, those left out by the globs) are dropped (``others: drop``, the default:
the delta is then exactly a LoRA adapter, as mergekit-extract-lora makes) or kept as they
are (``others: keep``).  Each factored tensor's relative reconstruction error
``‖Δ − B·A‖_F / ‖Δ‖_F`` (of the stored float32 factors) is in the manifest (``info``).

``weightflow export STEP DIR --format peft`` writes the factors as a PEFT LoRA adapter
(``lora_alpha = r``, so scaling 1): ``PeftModel.from_pretrained(base, DIR)`` merges to
``base + B·A``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from weightflow.dsl.lang.spec import DeltaRef, FiniteFloat, Kind, OpSpec, SeedParam

OVERSAMPLE = 10      # extra columns of the randomized range finder
POWER_ITERATIONS = 4
RANDOMIZED_MIN_SIDE = 1024


class ExtractLoraParams(SeedParam):
    delta: DeltaRef = Field(description="step producing the delta to factor")
    rank: int | None = Field(None, ge=1, description="rank r of every factored tensor (a cap with "
                                                     "sv_threshold or energy)")
    sv_threshold: FiniteFloat | None = Field(None, gt=0, description="keep every singular value above this")
    energy: FiniteFloat | None = Field(None, gt=0, le=1, description="keep the smallest rank with this "
                                                                    "fraction of ‖Δ‖_F² (0 < energy <= 1)")
    include: list[str] | None = Field(None, description="globs of the 2-D tensors to factor (default: all)")
    exclude: list[str] = Field(default_factory=list, description="globs of tensors not to factor")
    others: Literal["drop", "keep"] = Field("drop", description="tensors not factored: dropped, or kept as "
                                                                "they are")
    randomized: Literal["auto", True, False] = Field("auto", description="randomized SVD (needs rank); "
                                                                         "auto: for big matrices")
    seed: int | None = Field(None, ge=0, description="randomized SVD seed (default: the pipeline's)")

    @model_validator(mode="after")
    def _one_rule(self):
        if self.sv_threshold is not None and self.energy is not None:
            raise ValueError("give sv_threshold or energy, not both")
        if self.rank is None and self.sv_threshold is None and self.energy is None:
            raise ValueError("extract-lora needs 'rank' (an integer >= 1), 'sv_threshold' or 'energy'")
        if self.randomized is True and self.rank is None:
            raise ValueError("randomized: true needs 'rank' (a randomized SVD finds only the top singular "
                             "vectors, so it needs to know how many)")
        return self


def chosen_rank(s, params: ExtractLoraParams, total_sq: float) -> int:
    """The rank kept from singular values ``s`` (descending, a float64 tensor) of a delta with
    ``‖Δ‖_F² = total_sq``."""
    import torch

    r = s.numel() if params.rank is None else min(params.rank, s.numel())
    if params.sv_threshold is not None:
        r = min(r, int((s > params.sv_threshold).sum()))
    elif params.energy is not None:
        if total_sq <= 0:
            return 0
        kept = torch.cumsum(s * s, 0) / total_sq
        need = int((kept < params.energy * (1 - 1e-12)).sum()) + 1  # the first index reaching it
        r = min(r, need, s.numel())
    return r if total_sq > 0 else 0


def _use_randomized(params: ExtractLoraParams, shape) -> bool:
    if params.randomized != "auto":
        return bool(params.randomized)
    side = min(shape)
    return params.rank is not None and side >= RANDOMIZED_MIN_SIDE and params.rank + OVERSAMPLE <= side // 2


def factor(d, params: ExtractLoraParams, seed: int):
    """(A, B) of the 2-D float tensor ``d``, float32, and whether the SVD was randomized."""
    import torch

    d64 = d.to(torch.float64)
    total_sq = float((d64 * d64).sum())
    randomized = _use_randomized(params, d.shape)
    if randomized and params.rank is not None:
        q = min(params.rank + OVERSAMPLE, min(d.shape))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            u, s, v = torch.svd_lowrank(d.to(torch.float32), q=q, niter=POWER_ITERATIONS)
        u, s, vh = u.to(torch.float64), s.to(torch.float64), v.to(torch.float64).T
    else:
        u, s, vh = torch.linalg.svd(d64, full_matrices=False)
    r = chosen_rank(s, params, total_sq)
    root = s[:r].clamp_min(0).sqrt()
    b = (u[:, :r] * root).to(torch.float32).contiguous()
    a = (root[:, None] * vh[:r]).to(torch.float32).contiguous()
    return a, b, randomized


def relative_error(d, a, b) -> float:
    """‖Δ − B·A‖_F / ‖Δ‖_F in float64 (0 for a zero delta reproduced exactly)."""
    import torch

    d64 = d.to(torch.float64)
    rest = d64 - b.to(torch.float64) @ a.to(torch.float64)
    norm = float(torch.linalg.vector_norm(d64))
    return float(torch.linalg.vector_norm(rest)) / norm if norm else float(torch.linalg.vector_norm(rest) > 0)


def _tensor_seed(seed: int, digest: str, name: str) -> int:
    import blake3

    return int.from_bytes(blake3.blake3(f"{seed}\0{digest}\0{name}".encode()).digest()[:7], "little")


def run(inputs, params: ExtractLoraParams, ctx) -> dict:
    import numpy as np

    from weightflow.dsl.format.lowrank import LOWRANK_META, encode
    from weightflow.dsl.lang.diagnostics import OpError
    from weightflow.ops.lib.tensors import Checkpoint, TensorInfo, row_ranges, select

    art = inputs["delta"]
    delta = Checkpoint(art.path, prefix="delta", label=f"delta '{art.step}'")
    two_d = [n for n in delta.names() if len(delta.info[n].shape) == 2 and delta.is_float(n)]
    factored = set(select(two_d, params.include, params.exclude))
    if not factored:
        raise OpError(f"no 2-D tensor of delta '{art.step}' is left to factor by include/exclude "
                      f"({len(two_d)} 2-D tensors in it)")
    kept = [n for n in delta.names() if n not in factored and params.others == "keep"]
    names = [n for n in delta.names() if n in factored or n in kept]
    writer = ctx.delta_writer([TensorInfo(n, "F32" if n in factored else delta.info[n].dtype, delta.info[n].shape)
                               for n in names])
    ranks: dict[str, int] = {}
    errors: dict[str, float] = {}
    randomized: list[str] = []
    stored = dense = 0
    with ctx.progress(len(names), "lora") as bar:
        for n in names:
            if n in factored:
                d = delta.get(n)
                a, b, was_randomized = factor(d, params, _tensor_seed(ctx.seed, art.digest, n))
                parts, spec = encode(n, a.numpy(), b.numpy())
                writer.append_encoded(n, parts, LOWRANK_META, spec)
                ranks[n] = int(a.shape[0])
                errors[n] = relative_error(d, a, b)
                stored += sum(len(p[3]) for p in parts)
                dense += 4 * int(np.prod(d.shape))
                if was_randomized:
                    randomized.append(n)
            else:
                for lo, hi in row_ranges(delta.info[n].shape):
                    writer.append(n, delta.get(n, lo, hi))
            bar.update(1)
    writer.close()
    delta.close()
    ctx.info["relative_error"] = errors
    ctx.info["max_relative_error"] = max(errors.values(), default=0.0)
    ctx.info["factored_bytes"] = {"stored": stored, "dense_float32": dense}
    if randomized:
        ctx.info["randomized_svd"] = randomized
    return {"base": art.meta.get("base"), "model": art.meta.get("model"), "factored_from": art.digest,
            "ranks": ranks, "others": params.others,
            "dropped": [n for n in delta.names() if n not in factored and n not in kept]}


# -- export as a PEFT adapter (``weightflow export --format peft``) ----------------------

def peft_adapter(delta_dir: Path, base_dir: Path, dst: Path, step: str) -> dict:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` of the LoRA factors of an
    extract-lora delta into ``dst``; the base model directory tells which module each
    tensor belongs to (an ``nn.Linear``: ``lora_A``/``lora_B``; an ``nn.Embedding``: peft's
    transposed ``lora_embedding_A = Bᵀ``, ``lora_embedding_B = Aᵀ``).  ``lora_alpha = r``
    per module (``rank_pattern``/``alpha_pattern`` where ranks differ), so peft's scaling is
    1 and its merged weight is ``W + B·A``.  Returns {module: rank}.  Raises ValueError,
    saying why, for what an adapter cannot hold."""
    import peft
    import torch
    import transformers
    from safetensors.torch import save_file

    from weightflow.dsl.format.lowrank import LowRankTensor
    from weightflow.ops.lib.models import quiet_transformers
    from weightflow.ops.lib.tensors import Checkpoint

    delta = Checkpoint(delta_dir, prefix="delta", label=f"delta '{step}'")
    factors = {n: delta.encoding(n) for n in delta.names() if isinstance(delta.encoding(n), LowRankTensor)}
    others = [n for n in delta.names() if n not in factors]
    if others:
        raise ValueError(f"step '{step}' kept {len(others)} tensor(s) dense (e.g. '{others[0]}', with "
                         "others: keep); a PEFT adapter holds only LoRA factors: set others: drop, or "
                         "export with --format dense")
    config = transformers.AutoConfig.from_pretrained(base_dir, trust_remote_code=False)
    archs = getattr(config, "architectures", None) or []
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        raise ValueError(f"the base model's config.json names no architecture transformers knows "
                         f"({archs or 'none'}), so its modules are unknown")
    with quiet_transformers(), torch.device("meta"):
        model = cls(config)
    modules = dict(model.named_modules())
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for name, t in sorted(factors.items()):
        if t.rank == 0:
            continue  # a zero delta: nothing to adapt
        module_name = name.removesuffix(".weight")
        module = modules.get(module_name) if name.endswith(".weight") else None
        read = (lambda f: (lambda off, n: delta._read(f, off, n)))(t.file)
        a, b = (torch.from_numpy(x.copy()) for x in t.factors(read))
        key = f"base_model.model.{module_name}"
        if isinstance(module, torch.nn.Linear):
            tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = a, b
        elif isinstance(module, torch.nn.Embedding):
            tensors[f"{key}.lora_embedding_A"] = b.T.contiguous()
            tensors[f"{key}.lora_embedding_B"] = a.T.contiguous()
        else:
            what = "no module" if module is None else f"a {type(module).__name__}"
            raise ValueError(f"tensor '{name}' belongs to {what} of {archs[0]}; PEFT LoRA adapters here "
                             "cover nn.Linear and nn.Embedding weights: exclude it from the extract-lora step")
        ranks[module_name] = t.rank
    delta.close()
    if not ranks:
        raise ValueError(f"every factored tensor of step '{step}' has rank 0 (a zero delta): no adapter to write")
    r = max(ranks.values())
    other = {m: k for m, k in sorted(ranks.items()) if k != r}
    cfg = peft.LoraConfig(r=r, lora_alpha=r, target_modules=sorted(ranks), rank_pattern=other,
                          alpha_pattern=dict(other), lora_dropout=0.0, bias="none")
    cfg.save_pretrained(str(dst))
    save_file(tensors, str(dst / "adapter_model.safetensors"), metadata={"format": "pt"})
    doc = json.loads((dst / "adapter_config.json").read_text(encoding="utf-8"))
    (dst / "adapter_config.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return ranks


OP = OpSpec[ExtractLoraParams](name="extract-lora", version=1, output=Kind.DELTA, params=ExtractLoraParams,
                               run=run, doc=__doc__)
