"""lm-evaluation-harness tasks on the in-memory model (needs ``pip install lm-eval``); a
column per task and metric (``task/metric``), higher/lower-is-better as lm-eval says.  The
installed lm-eval version and the files of ``include_path`` enter the step key.
"""

from __future__ import annotations

from pydantic import Field, field_validator

from weightflow.dsl.lang.diagnostics import OpError
from weightflow.ops.metrics import LocalPath, Metric, MetricParams


class LmEvalMetric(MetricParams):
    """lm-evaluation-harness tasks on the in-memory model."""

    tasks: list[str] = Field(min_length=1, description="task names (lm-eval's, or from include_path)")
    include_path: LocalPath | None = Field(None, description="directory of extra task YAMLs (relative to "
                                           "the pipeline); its files' contents enter the step key")
    limit: float | None = Field(None, gt=0, description="examples per task (a fraction if < 1)")
    num_fewshot: int | None = Field(None, ge=0, description="few-shot examples")
    batch_size: int = Field(8, ge=1, description="lm-eval batch size")

    @field_validator("tasks", mode="before")
    @classmethod
    def _one_or_list(cls, v):
        return [v] if isinstance(v, str) else v


def fingerprint(items: list[LmEvalMetric], env) -> dict:
    """The installed lm-eval version and the task files of every include_path."""
    from importlib import metadata

    try:
        version = metadata.version("lm_eval")
    except metadata.PackageNotFoundError:
        version = None
    tasks = {}
    for d in [m.include_path for m in items if m.include_path]:
        root = env.data_path(d)
        if not root.is_dir():
            raise OpError(f"lm-eval include_path is not a directory: {root}")
        tasks[d] = {str(f.relative_to(root)): env.file_digest(f) for f in sorted(root.rglob("*")) if f.is_file()}
    return {"lm_eval": version, "include_path": tasks}


def lm_eval(subject, m: LmEvalMetric, ctx) -> tuple[dict, dict]:
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
        first_line = str(exc).splitlines()[0][:300] if str(exc) else ''
        raise OpError(f"lm-eval failed: {type(exc).__name__}: {first_line}") from None
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


METRIC = Metric(name="lm-eval", params=LmEvalMetric, compute=lm_eval, doc=__doc__, columns=None,
                fingerprint=fingerprint, scores_composites=False)
