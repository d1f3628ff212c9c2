"""``rmu``, Representation Misdirection for Unlearning (Li et al. 2024, the WMDP paper; as
open-unlearning's RMU): steer the output h_l of decoder layer ``layer`` on forget tokens
to a fixed random direction and keep it on retain tokens.  With u a unit vector of
uniform [0, 1) entries (drawn once from the step's seed, as WMDP draws it) and c =
``steering_coeff``: L_forget = mean_b (1/|y_b|)·Σ_t∈y_b (1/d)·‖h_l(x_f)_t − c·u‖² (t over
the target tokens of example b), and the retain term L_retain = the same distance between
h_l(x_r) and the frozen input model's h_l(x_r).  ``update`` picks the
parameters trained: ``down_proj`` (default, WMDP's and open-unlearning's default) the MLP
output projection of layers l−2..l, ``mlp`` every MLP weight of those layers, ``all``
the whole model (open-unlearning's TOFU config).  ``retain_loss`` and ``lora`` do not
apply."""

from typing import Literal

from weightflow.ops.unlearn_methods import (
    FORGET_WEIGHT,
    RETAIN_WEIGHT,
    ForgetBatch,
    Param,
    RetainBatch,
    UnlearnMethod,
    decoder_layers,
    target_mask,
)

UPDATE = ("down_proj", "mlp", "all")


def control_vector(seed: int, dim: int):
    """u: ``dim`` uniform [0, 1) entries from a generator seeded by the step's seed, unit norm."""
    import torch

    from weightflow.ops.lib.training import derived_seed

    g = torch.Generator().manual_seed(derived_seed(seed, "rmu"))
    u = torch.rand(dim, generator=g, dtype=torch.float32)
    return u / u.norm()


def activation_distance(hidden, target, mask):
    """mean over examples of (1/|y|)·Σ_t∈y mean_d (hidden − target)²."""
    per_token = (hidden.float() - target).pow(2).mean(-1)  # [B, T]
    m = mask.to(per_token.dtype)
    return ((per_token * m).sum(1) / m.sum(1).clamp(min=1)).mean()


def forget_loss(batch: ForgetBatch, opts: dict):
    u = control_vector(batch.seed, batch.hidden.shape[-1]).to(batch.hidden.device)
    return activation_distance(batch.hidden, opts["steering_coeff"] * u, target_mask(batch.labels, batch.task))


def retain_loss(batch: RetainBatch, opts: dict):
    return activation_distance(batch.hidden, batch.ref_hidden.float(), target_mask(batch.labels, batch.task))


def trainable(model, opts: dict) -> set:
    """Names of the parameters ``update`` selects."""
    import torch

    names = {n for n, p in model.named_parameters()}
    if opts["update"] == "all":
        return names
    prefix, layers = decoder_layers(model)
    chosen: set = set()
    for i in range(max(0, opts["layer"] - 2), opts["layer"] + 1):
        block = layers[i]
        mlp = next((m for n, m in block.named_children() if n in ("mlp", "feed_forward", "ffn")), None)
        if mlp is None:
            from weightflow.dsl.lang.diagnostics import OpError

            raise OpError(f"update: {opts['update']}: decoder layer {i} has no mlp module "
                          f"(its parts: {', '.join(n for n, _ in block.named_children())}); use update: all")
        base = f"{prefix}.{i}." + next(n for n, m in block.named_children() if m is mlp)
        linears = [n for n, m in mlp.named_modules() if n and hasattr(m, "weight")
                   and isinstance(m.weight, torch.Tensor) and m.weight.ndim == 2]
        if opts["update"] == "down_proj":  # the projection back to the residual stream
            linears = [n for n in linears if n.rsplit(".", 1)[-1] == "down_proj"] or linears[-1:]
        chosen |= {f"{base}.{n}.weight" for n in linears}
    return chosen & names


METHOD = UnlearnMethod(
    name="rmu", doc=__doc__,
    params={"forget_weight": FORGET_WEIGHT, "retain_weight": RETAIN_WEIGHT,
            "layer": Param(7, "decoder layer l whose output is steered", ge=0, annotation=int),
            "steering_coeff": Param(20.0, "norm c of the steering vector c·u", gt=0),
            "update": Param("down_proj", "parameters trained: down_proj (MLP output projections of layers "
                            "l-2..l), mlp (their MLPs) or all", annotation=Literal[UPDATE])},
    tasks=("causal-lm",), needs_hidden=True, forget_loss=forget_loss,
    retain_loss=retain_loss, trainable=trainable, refuses=("lora",))
