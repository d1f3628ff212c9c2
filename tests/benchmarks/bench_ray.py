"""What `--backend ray` buys on one machine: independent steps at once instead of in turn.

Run it as a script::

    .venv/bin/python tests/benchmarks/bench_ray.py [--jobs 2] [--max-steps 500]
                                                   [--out bench-results/ray.json]

Workload: a tiny Llama (tests/conftest.py's ``TINY_LLAMA``, random weights) loaded once,
then four independent steps: two full fine-tunes (different seeds, pre-tokenized data) and
two Wanda prunes with calibration (unstructured 50 % and 2:4).  The fine-tunes declare
``resources: {cpus: 1}`` so that two fit at once on a 2-core machine (a fine-tune's
default is every CPU of a worker, which would serialise them).

Each backend runs ``weightflow run`` in a fresh subprocess with a fresh store, in strict
mode (one ATen thread per step, so two steps on two cores do not fight over threads).
"wall" is the whole process: imports and, for Ray, starting a local Ray instance.  The
lock files of the two runs are compared (they must be equal).  Units: seconds; the
speed-up is sequential wall / ray wall; ``ray_startup_s`` (starting and stopping a local
Ray in a fresh process) is measured apart, and ``speedup_after_ray_startup`` takes it off
the Ray run's wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import save_tiny_llama  # noqa: E402  (the tests' tiny model builder)

WEIGHTFLOW = [sys.executable, "-m", "weightflow"]


def write_inputs(work: Path, max_steps: int) -> Path:
    """The tiny model, its data files and the pipeline; returns the pipeline's path."""
    import random

    base = save_tiny_llama(work / "base", seed=0)
    rng = random.Random(0)

    def rows(n: int, length: int) -> str:
        return "".join(json.dumps({"input_ids": [rng.randrange(3, 256) for _ in range(length)]}) + "\n"
                       for _ in range(n))

    (work / "train.jsonl").write_text(rows(128, 64))
    (work / "calib.jsonl").write_text(rows(32, 64))
    ft = ("{{op: finetune, model: base, data: train.jsonl, max_steps: {steps}, batch_size: 8, "
          "learning_rate: 0.001, seed: {seed}, resources: {{cpus: 1}}}}")
    wanda = "{{op: prune-wanda, model: base, calibration: {{data: calib.jsonl, samples: 32, seq_len: 64}}, {how}}}"
    two_four = 'pattern: "2:4"'
    text = (f"weightflow: 1\nname: bench-ray\nreproducible: strict\nsteps:\n"
            f"  base: {{op: load, source: {base}}}\n"
            f"  ft1: {ft.format(steps=max_steps, seed=1)}\n"
            f"  ft2: {ft.format(steps=max_steps, seed=2)}\n"
            f"  wanda50: {wanda.format(how='sparsity: 0.5')}\n"
            f"  wanda24: {wanda.format(how=two_four)}\n")
    path = work / "bench.yaml"
    path.write_text(text)
    return path


def run(pipeline: Path, work: Path, label: str, extra: list[str]) -> dict:
    store, lock = work / f"store-{label}", work / f"{label}.lock"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "WEIGHTFLOW_REMOTE": ""}
    started = time.perf_counter()
    out = subprocess.run([*WEIGHTFLOW, "run", str(pipeline), "--json", "--no-export", "--cache-dir", str(store),
                          "--lock", str(lock), *extra], capture_output=True, text=True, env=env, timeout=3600)
    wall = time.perf_counter() - started
    if out.returncode != 0:
        raise SystemExit(f"{label} run failed:\n{out.stderr[-3000:]}")
    steps = json.loads(out.stdout)["steps"]
    return {"wall_s": round(wall, 2), "steps_s": {s["name"]: s.get("seconds") for s in steps},
            "lock": lock.read_text()}


def ray_startup_s(jobs: int) -> float:
    """Seconds to start and stop a local Ray in a fresh process (imports included): the
    fixed cost `--backend ray` pays before its first task, to read the wall times against."""
    code = ("import time; t = time.perf_counter(); import ray; "
            f"ray.init(num_cpus={jobs}, include_dashboard=False); ray.shutdown(); print(time.perf_counter() - t)")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    return round(float(out.stdout.strip().splitlines()[-1]), 2) if out.returncode == 0 else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--max-steps", type=int, default=500)
    ap.add_argument("--out", default=str(ROOT / "bench-results" / "ray.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="wf-bench-ray-") as tmp:
        work = Path(tmp)
        pipeline = write_inputs(work, args.max_steps)
        sequential = run(pipeline, work, "sequential", [])
        ray = run(pipeline, work, "ray", ["--backend", "ray", "--jobs", str(args.jobs)])
    same_lock = sequential.pop("lock") == ray.pop("lock")
    startup = ray_startup_s(args.jobs)
    after_startup = ray["wall_s"] - startup
    result = {
        "benchmark": "ray-backend",
        "workload": f"tiny llama: 2 fine-tunes ({args.max_steps} steps, batch 8, seq 64, cpus: 1 each) + "
                    "2 Wanda prunes (32 calibration samples x 64 tokens), all independent; strict mode",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "jobs": args.jobs,
        "sequential": sequential,
        "ray": ray,
        "speedup": round(sequential["wall_s"] / ray["wall_s"], 2),
        "ray_startup_s": startup,
        "speedup_after_ray_startup": round(sequential["wall_s"] / after_startup, 2) if after_startup > 0 else None,
        "same_lock_file": same_lock,
        "units": "seconds of wall time; speedup = sequential / ray",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
