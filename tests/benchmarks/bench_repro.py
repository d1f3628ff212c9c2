"""What strict reproducibility costs: the same work timed in ``platform`` and ``strict`` mode.

Run it as a script (``make bench`` does)::

    .venv/bin/python tests/benchmarks/bench_repro.py [--rounds 1] [--only quickstart|smollm2]
                                                     [--out bench-results/reproducibility.json]

Workloads (the real examples; ``examples/prepare.py`` must have built their inputs, with
``--smollm2`` for the second):

``quickstart``
    ``examples/quickstart.yaml`` as committed (eleven steps on all-MiniLM-L6-v2).
``smollm2``
    From ``examples/smollm2.yaml``, with its settings: the ``smol`` load, the ``ai`` chat
    fine-tune (SmolLM2-135M, batch 8, seq 128, gradient checkpointing, 2 epochs) and the
    Wanda 2:4 step applied to the loaded model.

Each (workload, mode) runs ``weightflow run --reproducible MODE`` in a fresh subprocess
with a fresh store and a copy of the pipeline in a temporary directory (its lock file is
written there, never beside the committed example).  The modes alternate within a round
(platform, strict, then strict, platform in the next round), so a machine whose load
changes during the benchmark burdens both alike.  Per-step seconds come from the run's
``--json`` output; "wall" is the whole process, imports included.

Units: seconds of wall time.  The ratio is strict / platform.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
WEIGHTFLOW = [sys.executable, "-m", "weightflow"]
SMOLLM2_STEPS = ("smol", "ai", "sparse_2of4")
TIMEOUT_S = 3 * 3600


def quickstart_pipeline() -> str:
    return (EXAMPLES / "quickstart.yaml").read_text()


def smollm2_pipeline() -> str:
    """The example's load, "ai" fine-tune and Wanda 2:4 (on the loaded model), its settings
    read from examples/smollm2.yaml so the benchmark follows the example."""
    doc = yaml.safe_load((EXAMPLES / "smollm2.yaml").read_text())  # resolves the YAML merge keys
    steps = {n: doc["steps"][n] for n in SMOLLM2_STEPS}
    steps["sparse_2of4"] = {**steps["sparse_2of4"], "model": "smol"}
    bench = {k: doc[k] for k in ("weightflow", "seed", "dtype") if k in doc}
    bench.update(name="bench-smollm2", steps=steps)
    return yaml.safe_dump(bench, sort_keys=False)


WORKLOADS = {"quickstart": (quickstart_pipeline, ("models/all-MiniLM-L6-v2", "data/sentiment_train.jsonl")),
             "smollm2": (smollm2_pipeline, ("models/smollm2", "data/chat_ai_train.jsonl"))}


def check_inputs(name: str) -> str | None:
    missing = [p for p in WORKLOADS[name][1] if not (EXAMPLES / p).exists()]
    if missing:
        flag = " --smollm2" if name == "smollm2" else ""
        return f"{name}: missing {', '.join(missing)} (run `python examples/prepare.py{flag}` first)"
    return None


def run_once(name: str, mode: str, tmp: Path) -> dict:
    """One cold run of workload ``name`` in ``mode``: wall seconds and per-step seconds."""
    work = Path(tempfile.mkdtemp(prefix=f"{name}-{mode}-", dir=tmp))
    for sub in ("models", "data"):
        (work / sub).symlink_to(EXAMPLES / sub, target_is_directory=True)
    pipeline = work / f"{name}.yaml"
    pipeline.write_text(WORKLOADS[name][0]())
    cmd = [*WEIGHTFLOW, "run", str(pipeline), "--reproducible", mode, "--cache-dir", str(work / "store"),
           "--no-export", "--json", "-q"]
    started = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, cwd=work)
    wall = time.perf_counter() - started
    if res.returncode != 0:
        raise SystemExit(f"bench_repro: {name} ({mode}) failed:\n{res.stderr[-3000:]}")
    out = json.loads(res.stdout)
    steps = {s["name"]: s.get("seconds") for s in out["steps"] if s.get("status") == "executed"}
    lock = yaml.safe_load(pipeline.with_suffix(".lock").read_text())["steps"]
    shutil.rmtree(work, ignore_errors=True)
    return {"wall_s": round(wall, 2), "steps_s": steps,
            "platforms": sorted({e.get("platform", "?") for e in lock.values()}),
            "digests": {n: e["digest"] for n, e in sorted(lock.items())}}


def machine() -> dict:
    from weightflow.dsl.engine import repro

    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "cores": repro.cores(), "aten_isa": repro.aten_isa(), "python": platform.python_version(),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}


def summarize(name: str, runs: dict[str, list[dict]]) -> dict:
    def med(values):
        values = [v for v in values if v is not None]
        return round(statistics.median(values), 2) if values else None

    out: dict = {"rounds": len(runs["strict"]), "wall_s": {}, "steps_s": {}}
    for mode in ("platform", "strict"):
        out["wall_s"][mode] = med([r["wall_s"] for r in runs[mode]])
    out["wall_ratio"] = round(out["wall_s"]["strict"] / out["wall_s"]["platform"], 2)
    steps = list(runs["strict"][0]["steps_s"])
    for step in steps:
        per = {m: med([r["steps_s"].get(step) for r in runs[m]]) for m in ("platform", "strict")}
        if per["platform"] and per["strict"]:
            per["ratio"] = round(per["strict"] / per["platform"], 2)
        out["steps_s"][step] = per
    out["strict_digests_agree"] = len({json.dumps(r["digests"]) for r in runs["strict"]}) == 1
    out["platforms"] = {m: runs[m][0]["platforms"] for m in ("platform", "strict")}
    return out


def table(results: dict) -> str:
    lines = [f"{'workload / step':<28} {'platform s':>11} {'strict s':>9} {'strict/platform':>16}"]
    for name, r in results.items():
        lines.append(f"{name + ' (whole run)':<28} {r['wall_s']['platform']:>11.1f} {r['wall_s']['strict']:>9.1f} "
                     f"{r['wall_ratio']:>15.2f}x")
        for step, s in r["steps_s"].items():
            if s.get("ratio") is None or max(s["platform"], s["strict"]) < 5:
                continue  # steps under 5 s are noise at this scale
            lines.append(f"{'  ' + step:<28} {s['platform']:>11.1f} {s['strict']:>9.1f} {s['ratio']:>15.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=1, help="cold runs per mode (median reported)")
    ap.add_argument("--only", choices=sorted(WORKLOADS), action="append", help="run only this workload")
    ap.add_argument("--out", default=str(ROOT / "bench-results" / "reproducibility.json"))
    args = ap.parse_args(argv)
    names = args.only or list(WORKLOADS)
    problems = [p for p in map(check_inputs, names) if p]
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 2
    results = {}
    info = machine()
    with tempfile.TemporaryDirectory(prefix="wf-bench-repro-") as tmp:
        for name in names:
            runs: dict[str, list[dict]] = {"platform": [], "strict": []}
            for i in range(args.rounds):
                for mode in (("platform", "strict") if i % 2 == 0 else ("strict", "platform")):
                    print(f"bench_repro: {name}, round {i + 1}/{args.rounds}, {mode} ...", file=sys.stderr, flush=True)
                    runs[mode].append(run_once(name, mode, Path(tmp)))
                    print(f"bench_repro:   {runs[mode][-1]['wall_s']:.1f} s", file=sys.stderr, flush=True)
            results[name] = summarize(name, runs)
    doc = {"benchmark": "reproducibility", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "machine": info, "load_average_at_end": [round(x, 2) for x in os.getloadavg()], "results": results}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(table(results))
    print(f"\n(written to {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
