"""Fine-tuning against Hugging Face Trainer: the same job, side by side, in fresh processes.

Run it as a script (``make bench`` does)::

    .venv/bin/python tests/benchmarks/bench_train.py [--rounds 1] [--only minilm|smollm2]
        [--modes platform,strict] [--quick] [--out bench-results/train.json]

Jobs (``examples/prepare.py --smollm2`` must have built their inputs):

``minilm``
    all-MiniLM-L6-v2 with a new 2-label head on the 150 sentiment sentences, 5 epochs,
    batch 16, max_length 64, lr 1e-4, 10% linear warm-up then linear decay; held out: the
    50 test sentences (accuracy, loss).
``smollm2``
    SmolLM2-135M-Instruct (the example's GGUF, dequantized once into a safetensors directory
    that both sides start from, untimed), chat fine-tune on the "ai" pairs: chat template,
    loss on the responses only, batch 8, max_length 128, gradient checkpointing, 2 epochs,
    lr 5e-5, 10% warm-up; held out: the "ai" test pairs (response-token loss).

Each job runs as

``trainer``
    ``transformers.Trainer`` with its defaults where the job does not say otherwise (its
    default optimizer is torch's fused AdamW), no evaluation, no checkpoints, the model saved
    once at the end (weightflow stores it too);
``weightflow``
    ``weightflow run`` on a fresh store: a ``load`` step and the ``finetune`` step, as a user
    writes it (default settings);
``weightflow-fast``
    the same with the opt-in speed settings: ``optimizer: adamw_torch_fused`` (Trainer's
    kernel), and ``group_by_length: true`` for the classifier or ``packing: true`` and
    ``target_logits_only: true`` for the causal LM, all in float32 (packing removes the
    padding already; length grouping on top would only reorder the batches, which measured
    0.93× the loop time at a held-out perplexity of 19.76 instead of 19.44);
``trainer-bf16`` / ``weightflow-fast-bf16`` (platform mode only)
    Trainer with ``bf16=True`` (accelerate's bfloat16 autocast) against the opt-in settings
    plus ``bf16: true`` (the same autocast; weights, gradients and optimizer stay float32):
    the fair comparison for a user who accepts bfloat16 matmuls.  Strict mode pins portable
    kernels without the CPU's bfloat16 units, so the pair is not run there.

in ``platform`` and ``strict`` mode (strict: weightflow's reproducibility mode; the Trainer
child gets the same environment and torch settings, ``repro.apply`` + ``configure_torch``).
The variants alternate within a round and their order reverses every round, so a change of
load burdens all alike.  Measured per run: the whole process (wall seconds, imports
included), the training loop alone (Trainer's ``train_runtime``; weightflow's manifest
``timing.train_loop_s``), peak RSS of the process (``os.wait4``), and the held-out score of
the saved model, computed afterwards by one scorer for all (``--score``, untimed).

Units: seconds of wall time, MB of peak RSS.  Ratios are weightflow / Trainer (< 1: faster
or smaller).  The machine's load average is recorded at start and end: figures taken while
other jobs share the CPU are noisy.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
TIMEOUT_S = 3 * 3600
VARIANTS = ("trainer", "weightflow", "weightflow-fast", "trainer-bf16", "weightflow-fast-bf16")
PLATFORM_ONLY = ("trainer-bf16", "weightflow-fast-bf16")
#: each weightflow variant's reference (its ratio is variant / reference)
RATIOS = {"weightflow": "trainer", "weightflow-fast": "trainer", "weightflow-fast-bf16": "trainer-bf16"}

JOBS: dict[str, dict] = {
    "minilm": {"task": "sequence-classification", "model": "models/all-MiniLM-L6-v2",
               "train": "data/sentiment_train.jsonl", "test": "data/sentiment_test.jsonl",
               "epochs": 5, "batch_size": 16, "max_length": 64, "learning_rate": 1e-4, "warmup_ratio": 0.1,
               "gradient_checkpointing": False},
    "smollm2": {"task": "causal-lm", "model": "models/smollm2", "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
                "train": "data/chat_ai_train.jsonl", "test": "data/chat_ai_test.jsonl",
                "epochs": 2, "batch_size": 8, "max_length": 128, "learning_rate": 5e-5, "warmup_ratio": 0.1,
                "gradient_checkpointing": True},
}
QUICK = {"minilm": {"epochs": 1}, "smollm2": {"epochs": 0.25}}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# -- the same encoding on both sides ---------------------------------------------------

def encode(job: dict, tok, rows: list[dict]) -> list[dict]:
    """Token ids and targets as weightflow's finetune makes them for this job (written here
    independently): classification truncates to max_length; chat data is the chat template's
    user turn + generation prompt, then the response and EOS, with loss on the response."""
    out = []
    n = job["max_length"]
    for r in rows:
        if job["task"] == "sequence-classification":
            out.append({"input_ids": tok(r["text"], truncation=True, max_length=n)["input_ids"], "label": r["label"]})
            continue
        head = tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True,
                                       tokenize=True)
        head = list(head["input_ids"] if hasattr(head, "keys") else head)
        tail = tok(r["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids, labels = (head + tail)[:n], ([-100] * len(head) + tail)[:n]
        if any(t != -100 for t in labels[1:]):
            out.append({"input_ids": ids, "labels": labels})
    return out


def pad_batch(items: list[dict], pad_id: int):
    import torch

    width = max(len(i["input_ids"]) for i in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for row, it in enumerate(items):
        n = len(it["input_ids"])
        ids[row, :n] = torch.tensor(it["input_ids"])
        mask[row, :n] = 1
        if "labels" in it:
            labels[row, :n] = torch.tensor(it["labels"])
    out = {"input_ids": ids, "attention_mask": mask}
    out["labels"] = labels if "labels" in items[0] else torch.tensor([it["label"] for it in items])
    return out


# -- children: one run each ------------------------------------------------------------

def child_trainer(job: dict, model_dir: Path, out: Path, mode: str, bf16: bool = False) -> None:
    if mode == "strict":
        from weightflow.dsl.engine import repro

        repro.apply("strict")
        import torch  # noqa: F401  (after apply, as the contract says)

        repro.configure_torch("strict")
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    rows = read_jsonl(EXAMPLES / job["train"])
    if job["task"] == "sequence-classification":
        names = sorted({r["label"] for r in rows})
        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            model_dir, num_labels=len(names), id2label=dict(enumerate(names)),
            label2id={n: i for i, n in enumerate(names)}, dtype=torch.float32)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tok.pad_token_id
        data = [{**e, "label": names.index(e["label"])} for e in encode(job, tok, rows)]
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        model.config.use_cache = False
        data = encode(job, tok, rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    steps = math.ceil(job["epochs"] * math.ceil(len(data) / job["batch_size"]))
    args = transformers.TrainingArguments(
        output_dir=str(out / "trainer-tmp"), per_device_train_batch_size=job["batch_size"], max_steps=steps,
        learning_rate=job["learning_rate"], lr_scheduler_type="linear",
        warmup_steps=math.ceil(job["warmup_ratio"] * steps), weight_decay=0.0, max_grad_norm=1.0, seed=0,
        gradient_checkpointing=job["gradient_checkpointing"],
        gradient_checkpointing_kwargs={"use_reentrant": False} if job["gradient_checkpointing"] else None,
        save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True,
        logging_steps=1, dataloader_num_workers=0, remove_unused_columns=False, bf16=bf16)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                   data_collator=lambda items: pad_batch(items, pad))
    result = trainer.train()
    trainer.save_model(str(out / "model"))
    tok.save_pretrained(str(out / "model"))
    (out / "result.json").write_text(json.dumps({"loop_s": result.metrics["train_runtime"],
                                                 "steps": result.global_step}))


def weightflow_pipeline(job: dict, model_dir: Path, fast: bool, mode: str, bf16: bool = False) -> str:
    import yaml

    load = {"op": "load", "source": str(model_dir)}
    if job["task"] == "sequence-classification":
        load.update(task="sequence-classification", num_labels=2)
    ft = {"op": "finetune", "model": "base", "data": str(EXAMPLES / job["train"]),
          **{k: job[k] for k in ("epochs", "batch_size", "max_length", "learning_rate", "warmup_ratio")}}
    if job["gradient_checkpointing"]:
        ft["gradient_checkpointing"] = True
    if job["task"] == "causal-lm":
        ft.update(prompt_field="prompt", response_field="response", chat_template=True)
    if fast:  # packing already removes a causal LM's padding; length grouping would only reorder its batches
        ft["optimizer"] = "adamw_torch_fused"
        ft.update({"packing": True, "target_logits_only": True} if job["task"] == "causal-lm"
                  else {"group_by_length": True})
    if bf16:
        ft["bf16"] = True
    doc = {"weightflow": 1, "name": "bench-train", "reproducible": mode, "seed": 0, "dtype": "float32",
           "steps": {"base": load, "ft": ft}}
    return yaml.safe_dump(doc, sort_keys=False)


def run_child(cmd: list[str], cwd: Path, env: dict | None = None) -> tuple[float, float, str]:
    """(wall s, peak RSS MB, stderr tail) of one child process."""
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        tail = err.read()[-3000:]
    if proc.returncode != 0:
        raise SystemExit(f"bench_train: {' '.join(cmd[:4])} ... failed ({proc.returncode}):\n{tail}")
    return wall, usage.ru_maxrss / 1024, tail


def run_variant(name: str, job: dict, variant: str, mode: str, model_dir: Path, tmp: Path) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"{name}-{variant}-{mode}-", dir=tmp))
    bf16 = variant.endswith("-bf16")
    if variant.startswith("trainer"):
        cmd = [sys.executable, __file__, "--child-trainer", json.dumps(job), str(model_dir), str(work), mode,
               "bf16" if bf16 else "fp32"]
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        wall, rss, _ = run_child(cmd, work, env)
        res = json.loads((work / "result.json").read_text())
        produced, loop = work / "model", res["loop_s"]
    else:
        from weightflow.dsl.store.content import Store

        pipeline = work / "bench.yaml"
        pipeline.write_text(weightflow_pipeline(job, model_dir, variant.startswith("weightflow-fast"), mode, bf16))
        out_json = work / "run.json"
        cmd = [sys.executable, "-c", "import sys; from weightflow.dsl.cli import main; "
               f"sys.stdout = open({str(out_json)!r}, 'w'); main()",
               "run", str(pipeline), "--cache-dir", str(work / "store"), "--no-export", "--json", "-q"]
        wall, rss, _ = run_child(cmd, work)
        steps = {s["name"]: s for s in json.loads(out_json.read_text())["steps"]}
        entry = Store(work / "store").lookup(steps["ft"]["key"])
        produced, loop = entry.path, entry.manifest["info"]["timing"]["train_loop_s"]
    score = json.loads(subprocess.run([sys.executable, __file__, "--score", json.dumps(job), str(produced)],
                                      capture_output=True, text=True, check=True, timeout=TIMEOUT_S).stdout)
    shutil.rmtree(work, ignore_errors=True)
    return {"wall_s": round(wall, 2), "loop_s": round(loop, 2), "peak_rss_mb": round(rss), **score}


# -- the one scorer --------------------------------------------------------------------

def score(job: dict, model_dir: Path) -> dict:
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    rows = read_jsonl(EXAMPLES / job["test"])
    data = encode(job, tok, rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    total, count, correct = 0.0, 0, 0
    with torch.no_grad():
        if job["task"] == "sequence-classification":
            model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
            label2id = {v: int(k) for k, v in model.config.id2label.items()}
            for i in range(0, len(data), 16):
                b = pad_batch([{**e, "label": label2id[e["label"]]} for e in data[i: i + 16]], pad)
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
                total += float(torch.nn.functional.cross_entropy(logits, b["labels"], reduction="sum"))
                correct += int((logits.argmax(-1) == b["labels"]).sum())
                count += len(b["labels"])
            return {"heldout_loss": round(total / count, 4), "heldout_accuracy": round(correct / count, 4)}
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
        for i in range(0, len(data), 8):
            b = pad_batch(data[i: i + 8], pad)
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
            lg, lb = logits[:, :-1], b["labels"][:, 1:]
            total += float(torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), lb.reshape(-1),
                                                             ignore_index=-100, reduction="sum"))
            count += int((lb != -100).sum())
    return {"heldout_loss": round(total / count, 4), "heldout_ppl": round(math.exp(total / count), 2)}


# -- inputs, summary -------------------------------------------------------------------

def model_dir_for(name: str, job: dict, tmp: Path) -> Path:
    """The job's starting model as a safetensors directory (SmolLM2: dequantized once)."""
    src = EXAMPLES / job["model"]
    if "gguf" not in job:
        return src
    out = tmp / "smollm2-hf"
    if not out.is_dir():
        code = ("import sys, torch, transformers as t; s, g, o = sys.argv[1:]; "
                "m = t.AutoModelForCausalLM.from_pretrained(s, gguf_file=g, dtype=torch.float32); "
                "c = m.config; delattr(c, 'quantization_config') if hasattr(c, 'quantization_config') else None; "
                "n = t.AutoModelForCausalLM.from_config(c); n.load_state_dict(m.state_dict()); "
                "n.save_pretrained(o); t.AutoTokenizer.from_pretrained(s, gguf_file=g).save_pretrained(o)")
        subprocess.run([sys.executable, "-c", code, str(src), job["gguf"], str(out)], check=True,
                       capture_output=True, timeout=TIMEOUT_S)
    return out


def check_inputs(job: dict) -> str | None:
    missing = [p for p in (job["model"], job["train"], job["test"]) if not (EXAMPLES / p).exists()]
    return f"missing {', '.join(missing)} (run `python examples/prepare.py --smollm2`)" if missing else None


def summarize(runs: dict[str, list[dict]]) -> dict:
    def med(key, variant):
        return round(statistics.median(r[key] for r in runs[variant]), 4)

    out: dict = {v: {k: med(k, v) for k in runs[v][0]} for v in runs if runs[v]}
    pairs = [*RATIOS.items(), ("weightflow-fast-bf16", "trainer")]  # bf16 also against Trainer's defaults
    for v, ref in pairs:
        if v in out and ref in out:
            out[f"{v}/{ref}"] = {k: round(out[v][k] / out[ref][k], 2) for k in ("wall_s", "loop_s", "peak_rss_mb")}
    return out


def table(results: dict) -> str:
    lines = [f"{'job / mode':<20} {'variant':<16} {'wall s':>8} {'loop s':>8} {'RSS MB':>7} {'held out':>10}"
             f" {'wall×':>6} {'loop×':>6} {'RSS×':>6}"]
    for (job, mode), r in results.items():
        for v in VARIANTS:
            if v not in r:
                continue
            s = r[v]
            held = s.get("heldout_accuracy", s.get("heldout_ppl"))
            ratio = r.get(f"{v}/{RATIOS.get(v, '')}", {})
            lines.append(f"{job + ' ' + mode:<20} {v:<16} {s['wall_s']:>8.1f} {s['loop_s']:>8.1f} "
                         f"{s['peak_rss_mb']:>7.0f} {held:>10} " + " ".join(
                             f"{ratio[k]:>6.2f}" if k in ratio else f"{'':>6}"
                             for k in ("wall_s", "loop_s", "peak_rss_mb")))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:  # noqa: C901
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child-trainer":
        child_trainer(json.loads(argv[1]), Path(argv[2]), Path(argv[3]), argv[4], argv[5] == "bf16")
        return 0
    if argv and argv[0] == "--score":
        print(json.dumps(score(json.loads(argv[1]), Path(argv[2]))))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=1, help="runs per variant (median reported)")
    ap.add_argument("--only", choices=sorted(JOBS), action="append", help="run only this job (repeatable)")
    ap.add_argument("--modes", default="platform,strict", help="comma-separated: platform, strict")
    ap.add_argument("--quick", action="store_true", help="fewer epochs (a smoke run, not the figures)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench-results" / "train.json")
    args = ap.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    load_start = [round(x, 2) for x in os.getloadavg()]
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp_s:
        tmp = Path(tmp_s)
        for name in args.only or sorted(JOBS):
            job = {**JOBS[name], **(QUICK[name] if args.quick else {})}
            why = check_inputs(job)
            if why:
                print(f"bench_train: skipping {name}: {why}", file=sys.stderr)
                continue
            model_dir = model_dir_for(name, job, tmp)
            for mode in modes:
                variants = [v for v in VARIANTS if mode == "platform" or v not in PLATFORM_ONLY]
                runs: dict[str, list[dict]] = {v: [] for v in variants}
                for rnd in range(args.rounds):
                    for v in (variants if rnd % 2 == 0 else variants[::-1]):
                        runs[v].append(run_variant(name, job, v, mode, model_dir, tmp))
                        print(f"  {name} {mode} {v}: {runs[v][-1]}", file=sys.stderr, flush=True)
                results[(name, mode)] = summarize(runs)
    print(table(results))
    doc = {"benchmark": "train", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "quick": args.quick, "rounds": args.rounds,
           "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                       "python": platform.python_version(), "load_average_at_start": load_start},
           "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
           "jobs": {n: {k: v for k, v in JOBS[n].items()} for n in JOBS},
           "results": {f"{job} {mode}": r for (job, mode), r in results.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
