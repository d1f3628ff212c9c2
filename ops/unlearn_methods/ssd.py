"""``ssd``, Selective Synaptic Dampening (Foster et al. 2024): no gradient steps.
Diagonal Fisher importances I = mean over batches of the squared gradient of the batch's
loss (eval mode; ``batch_size: 1`` gives the per-example empirical Fisher), I_f on the
forget data and I_D on the retain data; every parameter with I_f > ``alpha``·I_D is
multiplied by min(``lambda``·I_D/I_f, 1)."""

from weightflow.ops.unlearn_methods import Job, Param, UnlearnMethod


def importances(model, examples, batch_size: int, pad_id: int, task: str, device: str, bar) -> dict:
    """Mean over batches of the squared gradient of each batch's mean loss, per parameter."""
    import torch

    from weightflow.ops.lib import training as T

    model.eval()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    imp = {n: torch.zeros_like(p) for n, p in params.items()}
    batches = 0
    for i in range(0, len(examples), batch_size):
        model.zero_grad(set_to_none=True)
        batch = T.collate(examples[i: i + batch_size], pad_id, task, device)
        nll_sum, n_tok, _ = T.sequence_nll(model, batch, task)
        T.mean_nll(nll_sum, n_tok).backward()
        for n, p in params.items():
            if p.grad is not None:
                imp[n] += p.grad.pow(2)
        batches += 1
        bar.update(1)
    model.zero_grad(set_to_none=True)
    return {n: v / batches for n, v in imp.items()}


def dampen(model, imp_f: dict, imp_d: dict, alpha: float, lam: float) -> dict:
    """θ ← θ·min(λ·I_D/I_f, 1) where I_f > α·I_D; returns how many elements were selected."""
    import torch

    counts = {}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n not in imp_f:
                continue
            i_f, i_d = imp_f[n], imp_d[n]
            selected = i_f > alpha * i_d
            factor = torch.where(selected, (lam * i_d / torch.where(selected, i_f, 1.0)).clamp(max=1.0), 1.0)
            p.mul_(factor)
            if int(selected.sum()):
                counts[n] = int(selected.sum())
    return counts


def apply(job: Job) -> dict:
    bs = job.batch_size
    n_batches = -(-len(job.forget) // bs) + -(-len(job.retain) // bs)
    with job.ctx.progress(n_batches, "importances", unit="batch") as bar:
        imp_f = importances(job.model, job.forget, bs, job.pad_id, job.task, job.device, bar)
        imp_d = importances(job.model, job.retain, bs, job.pad_id, job.task, job.device, bar)
    counts = dampen(job.model, imp_f, imp_d, job.opts["alpha"], job.opts["lambda"])
    total = sum(p.numel() for p in job.model.parameters())
    return {"dampened": sum(counts.values()), "parameters": total, "per_tensor": counts}


METHOD = UnlearnMethod(
    name="ssd", doc=__doc__,
    params={"alpha": Param(10.0, "dampen where I_f > alpha·I_D", gt=0),
            "lambda": Param(1.0, "dampening factor min(lambda·I_D/I_f, 1)", gt=0)},
    needs_retain=True, retain_use="its importances I_D", apply=apply)
