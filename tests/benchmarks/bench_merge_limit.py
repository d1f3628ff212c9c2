"""Merges at disk speed: the TIES merge step against the I/O limit, and mergekit side by side.

Run it as a script (it is not a pytest test; pytest only collects ``test_*.py``)::

    .venv/bin/python tests/benchmarks/bench_merge_limit.py [--size-gb 1.0] [--repeats 2]
        [--out bench-results/merge.json] [--methods ties,dare-ties,model_stock,slerp]
        [--skip-mergekit] [--no-check] [--keep-tmp]

The models: a base and two "fine-tunes" (base + small noise) of a llama-shaped float32
``LlamaForCausalLM`` of about ``--size-gb`` GB each (``bench_vs_mergekit.write_family``).
The deltas ``d1 = ft1 - base``, ``d2 = ft2 - base`` are computed once, before anything is
timed, so the TIES step reads three files of about S bytes each (base, d1, d2) and writes one.

1. The limit of a streaming merge: reading its inputs and writing its output.  Measured as a
   plain read of the three input files of the TIES step (the store's objects, page cache
   warm: each read once before) into a reused buffer, then a write of one file of the
   merged output's size, in 4 MB writes, on the store's filesystem, with the store's fsync
   policy (written, flushed, fsynced, as ``ShardedWriter.close`` does), then removed.
2. The TIES merge step (weights [1.0, 0.5], density 0.5, normalize; float32): ``weightflow run
   --target ties --force ties`` in a fresh process, its inputs cached.  Reported: the step's
   own seconds from the run's ``--json`` (op run + fsync + digest, not process start-up or
   publishing), the whole process's wall time and its peak RSS.  **step / limit** is the
   figure of issue 15 (target: <= 3); each TIES run is paired with a limit measurement
   taken right before it, and the median of the pairs' ratios is reported beside the ratio
   of the medians.
3. mergekit side by side, alternating runs (weightflow, mergekit, weightflow, ...):
   ``mergekit-yaml`` (CLI, ``--lazy-unpickle --no-cuda --no-copy-tokenizer
   --no-write-model-card``) against ``weightflow run`` of the same merge, for TIES,
   DARE-TIES (density 0.5, same weights; mergekit's masks are its own random draws),
   Model Stock (base + ft1, ft2) and SLERP (ft1 -> ft2, t = 0.5).  mergekit takes the models
   and computes the deltas itself, so for the delta methods weightflow's like-for-like process
   is ``--force d1 --force d2 --force STEP`` (deltas + merge in one process); the merge step
   alone is reported beside it.  Time and peak-RSS ratios are mergekit over weightflow (median
   of the repeats).
4. Check: the TIES outputs of weightflow and mergekit agree (max |difference|, every
   differing element at a trim cut-off tie; ``bench_vs_mergekit.compare_dirs``).

Peak RSS is the kernel high-water mark of the measured process (``wait4`` rusage through a
small launcher, ``bench_spine.measured_run``).  The bound checked: weightflow's TIES step
peaks under 0.25 * S + 300 MB.  The machine's load average is recorded before and after each
run: on a shared machine every figure here moves with it.

Units: MB = 1e6 bytes, GB = 1e9 bytes.  Everything is written under a temporary directory in
/tmp, removed at the end (``--keep-tmp`` keeps it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_spine as spine  # noqa: E402  (measurement helpers)
import bench_vs_mergekit as vs  # noqa: E402  (the model family, mergekit's CLI, output comparison)

MB, GB = spine.MB, spine.GB
BOUND_FRACTION, BOUND_CONST = 0.25, 300 * MB
WEIGHTS, DENSITY, SLERP_T, SEED = (1.0, 0.5), 0.5, 0.5, 0
METHODS = ("ties", "dare-ties", "model_stock", "slerp")
STEP = {"ties": "ties", "dare-ties": "dare_ties", "model_stock": "stock", "slerp": "slerp"}
DELTA_METHODS = {"ties", "dare-ties"}
WRITE_CHUNK = 4 << 20


def log(msg: str = "") -> None:
    print(msg, flush=True)


def load() -> float:
    return round(os.getloadavg()[0], 2)


def pipeline_text(dirs: dict[str, Path]) -> str:
    w = f"[{WEIGHTS[0]}, {WEIGHTS[1]}]"
    return textwrap.dedent(f"""\
        weightflow: 1
        name: bench-merge-limit
        dtype: float32
        seed: {SEED}
        steps:
          base: {{op: load, source: {json.dumps(str(dirs['base']))}}}
          ft1:  {{op: load, source: {json.dumps(str(dirs['ft1']))}}}
          ft2:  {{op: load, source: {json.dumps(str(dirs['ft2']))}}}
          d1:   {{op: extract-delta, model: ft1, base: base}}
          d2:   {{op: extract-delta, model: ft2, base: base}}
          ties: {{op: merge, method: ties, base: base, deltas: [d1, d2], weights: {w}, density: {DENSITY}}}
          dare_ties: {{op: merge, method: dare-ties, base: base, deltas: [d1, d2], weights: {w},
                      density: {DENSITY}}}
          stock: {{op: merge, method: model_stock, base: base, models: [ft1, ft2]}}
          slerp: {{op: merge, method: slerp, models: [ft1, ft2], t: {SLERP_T}}}
        """)


def mergekit_config(method: str, dirs: dict[str, Path]) -> str:
    b, f1, f2 = (str(dirs[k]) for k in ("base", "ft1", "ft2"))
    if method in ("ties", "dare-ties"):
        return textwrap.dedent(f"""\
            merge_method: {method.replace('-', '_')}
            base_model: {b}
            models:
              - model: {f1}
                parameters: {{weight: {WEIGHTS[0]}, density: {DENSITY}}}
              - model: {f2}
                parameters: {{weight: {WEIGHTS[1]}, density: {DENSITY}}}
            parameters: {{normalize: true}}
            dtype: float32
            """)
    if method == "model_stock":
        return (f"merge_method: model_stock\nbase_model: {b}\nmodels:\n  - model: {f1}\n  - model: {f2}\n"
                "dtype: float32\n")
    return (f"merge_method: slerp\nbase_model: {f1}\nmodels:\n  - model: {f1}\n  - model: {f2}\n"
            f"parameters: {{t: {SLERP_T}}}\ndtype: float32\n")


# -- the limit ------------------------------------------------------------------------------

def read_files(files: list[Path], buf: bytearray) -> int:
    mv, total = memoryview(buf), 0
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while True:
                n = fh.readinto(mv)
                if not n:
                    break
                total += n
    return total


def write_file(path: Path, size: int, buf: bytearray) -> None:
    """``size`` bytes in WRITE_CHUNK writes, flushed and fsynced (ShardedWriter.close's policy)."""
    mv = memoryview(buf)[:WRITE_CHUNK]
    with open(path, "wb") as fh:
        left = size
        while left > 0:
            left -= fh.write(mv[:min(WRITE_CHUNK, left)])
        fh.flush()
        os.fsync(fh.fileno())


def measure_limit(inputs: list[Path], out_bytes: int, scratch: Path) -> dict:
    """One plain read of ``inputs`` and one write + fsync of ``out_bytes`` (page cache warm)."""
    buf = bytearray(16 << 20)
    for i, b in enumerate(range(0, len(buf), 4096)):  # touch the buffer: no first-use page faults timed
        buf[b] = i & 0xFF
    t = time.perf_counter()
    nread = read_files(inputs, buf)
    read_s = time.perf_counter() - t
    target = scratch / "limit-write.bin"
    t = time.perf_counter()
    write_file(target, out_bytes, buf)
    write_s = time.perf_counter() - t
    target.unlink()
    return {"read_bytes": nread, "read_s": round(read_s, 3), "write_bytes": out_bytes,
            "write_fsync_s": round(write_s, 3), "limit_s": round(read_s + write_s, 3),
            "read_gb_s": round(nread / read_s / GB, 2), "write_gb_s": round(out_bytes / write_s / GB, 2)}


# -- runs ------------------------------------------------------------------------------------

def wf_measure(pipeline: Path, cache: Path, step: str, extra_force: tuple[str, ...] = ()) -> dict:
    forced = [a for s in (*extra_force, step) for a in ("--force", s)]
    before = load()
    res = spine.wf_run(pipeline, cache, "--target", step, *forced)
    st = spine._statuses(res)
    ran = {n for n, s in st.items() if s["status"] == "executed"}
    want = {step, *extra_force}
    if ran != want:
        raise SystemExit(f"weightflow --target {step}: expected {sorted(want)} to execute, got {sorted(ran)}")
    return {"step_s": st[step].get("seconds"), "steps_s_total": round(sum(st[n].get("seconds") or 0 for n in ran), 3),
            "process_wall_s": round(res["wall_s"], 2), "peak_rss_mb": round(res["peak_rss"] / MB, 1),
            "load_before": before, "load_after": load(), "digest": st[step].get("digest")}


def mk_measure(work: Path, method: str, dirs: dict[str, Path], keep_out: Path | None = None) -> dict:
    cfg = work / f"mk-{method}.yml"
    cfg.write_text(mergekit_config(method, dirs))
    out = keep_out or work / f"mk-{method}-out"
    exe = Path(sys.executable).parent / "mergekit-yaml"
    cmd = [str(exe) if exe.exists() else "mergekit-yaml", str(cfg), str(out), "--no-copy-tokenizer",
           "--lazy-unpickle", "--no-cuda", "--quiet", "--no-write-model-card"]
    before = load()
    res = spine._check(spine.measured_run(cmd), f"mergekit-yaml ({method})")
    if keep_out is None:
        shutil.rmtree(out, ignore_errors=True)
    return {"process_wall_s": round(res["wall_s"], 2), "peak_rss_mb": round(res["peak_rss"] / MB, 1),
            "load_before": before, "load_after": load()}


def med(runs: list[dict], key: str) -> float:
    return round(statistics.median(r[key] for r in runs), 3)


def bench(work: Path, size_gb: float, repeats: int, methods: list[str], with_mergekit: bool, check: bool) -> dict:
    from weightflow.dsl.store.content import Store

    cfg = vs.geometry(size_gb * GB)
    t = time.perf_counter()
    dirs, size = vs.write_family(work / "models", cfg)
    log(f"wrote base + 2 fine-tunes of {size / MB:.1f} MB each (hidden {cfg['hidden_size']}, "
        f"{cfg['num_hidden_layers']} layers, vocab {cfg['vocab_size']}) in {time.perf_counter() - t:.0f} s")
    pipeline = work / "p.yaml"
    pipeline.write_text(pipeline_text(dirs))
    cache = work / "cache"
    t = time.perf_counter()
    prep = spine.wf_run(pipeline, cache, "--target", "d1", "--target", "d2", poll=False)
    log(f"setup: loads + deltas cached in {time.perf_counter() - t:.0f} s")
    lock = {n: s["digest"] for n, s in ((s["name"], s) for s in json.loads(prep["stdout"])["steps"])}
    store = Store(cache)
    inputs = [f for n in ("base", "d1", "d2") for f in sorted(store.object_path(lock[n]).glob("*.safetensors"))]
    in_bytes = sum(f.stat().st_size for f in inputs)
    scratch = cache / "tmp"
    scratch.mkdir(parents=True, exist_ok=True)
    bound = BOUND_FRACTION * size + BOUND_CONST
    r: dict = {"S_mb": round(size / MB, 1), "inputs_mb": round(in_bytes / MB, 1),
               "model_config": {k: cfg[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                    "vocab_size")},
               "bound_mb": round(bound / MB, 1), "bound": f"{BOUND_FRACTION} * S + {BOUND_CONST / MB:.0f} MB"}
    buf = bytearray(16 << 20)
    read_files(inputs, buf)  # page cache warm

    # 1 + 2: the limit and the TIES step, paired
    ties_runs, limits = [], []
    wf_ties = wf_measure(pipeline, cache, "ties")  # the first run: its output size, and a warm-up
    out_bytes = sum(f.stat().st_size for f in store.object_path(wf_ties["digest"]).glob("*.safetensors"))
    r["output_mb"] = round(out_bytes / MB, 1)
    for k in range(repeats):
        limits.append(measure_limit(inputs, out_bytes, scratch))
        ties_runs.append(wf_measure(pipeline, cache, "ties"))
        lim, tr = limits[-1], ties_runs[-1]
        log(f"  [{k + 1}/{repeats}] limit {lim['limit_s']:6.2f} s (read {lim['read_s']:.2f} s at "
            f"{lim['read_gb_s']} GB/s, write + fsync {lim['write_fsync_s']:.2f} s)   TIES step {tr['step_s']:6.2f} s "
            f"(process {tr['process_wall_s']:.2f} s, peak RSS {tr['peak_rss_mb']:.0f} MB)  "
            f"ratio {tr['step_s'] / lim['limit_s']:.2f}  load {tr['load_before']}")
    r["limit"] = {"runs": limits, "median_s": med(limits, "limit_s"), "min_s": min(x["limit_s"] for x in limits),
                  "median_read_s": med(limits, "read_s"), "median_write_fsync_s": med(limits, "write_fsync_s")}
    r["ties_step"] = {"runs": ties_runs, "warmup": wf_ties, "median_step_s": med(ties_runs, "step_s"),
                      "median_process_wall_s": med(ties_runs, "process_wall_s"),
                      "max_peak_rss_mb": max(x["peak_rss_mb"] for x in ties_runs)}
    pair = [tr["step_s"] / lim["limit_s"] for tr, lim in zip(ties_runs, limits, strict=True)]
    r["step_over_limit"] = {"median_of_pairs": round(statistics.median(pair), 2), "pairs": [round(x, 2) for x in pair],
                            "ratio_of_medians": round(r["ties_step"]["median_step_s"] / r["limit"]["median_s"], 2),
                            "process_over_limit": round(r["ties_step"]["median_process_wall_s"]
                                                        / r["limit"]["median_s"], 2),
                            "target": 3.0}
    r["bound_check"] = {"peak_rss_mb": r["ties_step"]["max_peak_rss_mb"], "bound_mb": round(bound / MB, 1),
                        "pass": r["ties_step"]["max_peak_rss_mb"] * MB <= bound}

    # 3: mergekit side by side, alternating
    if with_mergekit:
        r["vs_mergekit"] = {}
        for method in methods:
            step = STEP[method]
            deltas = ("d1", "d2") if method in DELTA_METHODS else ()
            runs: dict[str, list] = {"weightflow_merge": [], "weightflow_like_for_like": [], "mergekit": []}
            for k in range(repeats):
                runs["weightflow_merge"].append(wf_measure(pipeline, cache, step))
                if deltas:
                    runs["weightflow_like_for_like"].append(wf_measure(pipeline, cache, step, deltas))
                keep = work / "mk-ties-out" if (check and method == "ties" and k == 0) else None
                runs["mergekit"].append(mk_measure(work, method, dirs, keep_out=keep))
                wm, mk = runs["weightflow_merge"][-1], runs["mergekit"][-1]
                both = (f", deltas + merge {runs['weightflow_like_for_like'][-1]['process_wall_s']:7.2f} s"
                        if deltas else "")
                log(f"  {method:<12} [{k + 1}/{repeats}] weightflow merge {wm['process_wall_s']:7.2f} s{both}"
                    f"   mergekit-yaml {mk['process_wall_s']:7.2f} s   peak RSS wf {wm['peak_rss_mb']:.0f} MB, "
                    f"mk {mk['peak_rss_mb']:.0f} MB   load {load()}")
            if not deltas:
                runs["weightflow_like_for_like"] = runs["weightflow_merge"]
            m: dict[str, Any] = {name: {"median_process_wall_s": med(v, "process_wall_s"),
                                        "median_peak_rss_mb": med(v, "peak_rss_mb"), "runs": v}
                                 for name, v in runs.items()}
            ref = m["weightflow_like_for_like"]
            m["mergekit_over_weightflow"] = {
                "time": round(m["mergekit"]["median_process_wall_s"] / ref["median_process_wall_s"], 2),
                "peak_rss": round(m["mergekit"]["median_peak_rss_mb"] / ref["median_peak_rss_mb"], 2),
                "time_vs_merge_step_alone": round(m["mergekit"]["median_process_wall_s"]
                                                  / m["weightflow_merge"]["median_process_wall_s"], 2),
                "compared": ("weightflow deltas + merge in one process (mergekit computes the deltas itself)"
                             if deltas else "weightflow merge process")}
            r["vs_mergekit"][method] = m

    # 4: the outputs agree
    if check and with_mergekit and "ties" in methods:
        wf_out = work / "wf-ties-out"
        spine._check(spine.measured_run(spine._cli() + ["export", str(pipeline), "ties", str(wf_out),
                                                        "--cache-dir", str(cache)], poll=False), "weightflow export")
        vs.WEIGHTS, vs.DENSITY = WEIGHTS, DENSITY
        c = vs.compare_dirs(wf_out, work / "mk-ties-out", sources=dirs)
        r["check_ties_vs_mergekit"] = {k: c[k] for k in ("tensors_compared", "elements", "max_abs_diff",
                                                         "elements_differing",
                                                         "differing_elements_not_at_a_trim_cutoff")}
        shutil.rmtree(wf_out, ignore_errors=True)
    return r


def print_summary(r: dict) -> None:
    lim, ties, q = r["limit"], r["ties_step"], r["step_over_limit"]
    log(f"\nS = {r['S_mb']} MB per model; TIES step inputs {r['inputs_mb']} MB (base + 2 deltas), output "
        f"{r['output_mb']} MB")
    log(f"  limit (plain read of the inputs + write + fsync of one output), median: {lim['median_s']:.2f} s "
        f"(read {lim['median_read_s']:.2f} s, write + fsync {lim['median_write_fsync_s']:.2f} s; best "
        f"{lim['min_s']:.2f} s)")
    log(f"  TIES merge step, median: {ties['median_step_s']:.2f} s (whole process "
        f"{ties['median_process_wall_s']:.2f} s); peak RSS {ties['max_peak_rss_mb']:.0f} MB, bound {r['bound_mb']} MB: "
        f"{'PASS' if r['bound_check']['pass'] else 'FAIL'}")
    log(f"  step / limit = {q['median_of_pairs']:.2f} (median of paired runs {q['pairs']}; ratio of medians "
        f"{q['ratio_of_medians']:.2f}; whole process / limit {q['process_over_limit']:.2f}; target <= {q['target']})")
    if "vs_mergekit" in r:
        log(f"  {'method':<12} {'wf merge s':>10} {'wf d+m s':>9} {'mergekit s':>10} {'time mk/wf':>10} "
            f"{'wf RSS MB':>9} {'mk RSS MB':>9} {'RSS mk/wf':>9}")
        for method, m in r["vs_mergekit"].items():
            q = m["mergekit_over_weightflow"]
            log(f"  {method:<12} {m['weightflow_merge']['median_process_wall_s']:10.2f} "
                f"{m['weightflow_like_for_like']['median_process_wall_s']:9.2f} "
                f"{m['mergekit']['median_process_wall_s']:10.2f} {q['time']:10.2f} "
                f"{m['weightflow_like_for_like']['median_peak_rss_mb']:9.0f} "
                f"{m['mergekit']['median_peak_rss_mb']:9.0f} {q['peak_rss']:9.2f}")
        log("  (time and RSS ratios: mergekit over weightflow's like-for-like process: deltas + merge for ties and "
            "dare-ties, the merge for model_stock and slerp; process wall times, medians)")
    if "check_ties_vs_mergekit" in r:
        c = r["check_ties_vs_mergekit"]
        log(f"  TIES outputs, weightflow vs mergekit: max |diff| {c['max_abs_diff']:.3g}, {c['elements_differing']} "
            f"of {c['elements']} elements differ, {c['differing_elements_not_at_a_trim_cutoff']} not at a trim "
            "cut-off tie")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, default=1.0, help="size S of each synthetic model (GB)")
    ap.add_argument("--repeats", type=int, default=2, help="paired runs of each measurement")
    ap.add_argument("--methods", default=",".join(METHODS), help="methods compared with mergekit")
    ap.add_argument("--out", default="bench-results/merge.json", help="JSON results file")
    ap.add_argument("--skip-mergekit", action="store_true", help="only the limit and the TIES step")
    ap.add_argument("--no-check", action="store_true", help="skip comparing the TIES outputs")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temporary directory")
    args = ap.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        ap.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")

    started = time.perf_counter()
    from importlib.metadata import version

    import psutil
    import torch

    doc: dict = {
        "benchmark": "merge_limit",
        "units": "MB = 1e6 bytes, GB = 1e9 bytes; RSS = resident set size (kernel high-water mark)",
        "size_gb": args.size_gb, "repeats": args.repeats,
        "job": {"ties": {"weights": list(WEIGHTS), "density": DENSITY, "normalize": True},
                "dare-ties": {"weights": list(WEIGHTS), "density": DENSITY, "normalize": True, "seed": SEED},
                "model_stock": {"models": ["ft1", "ft2"]}, "slerp": {"t": SLERP_T}, "dtype": "float32"},
        "git": spine._git_state(),
        "machine": {"cpus": os.cpu_count(), "ram_gb": round(psutil.virtual_memory().total / GB, 1),
                    "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                    "merge_threads_env": os.environ.get("WEIGHTFLOW_MERGE_THREADS"),
                    **({"mergekit": version("mergekit")} if not args.skip_mergekit else {})},
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    tmp = Path(tempfile.mkdtemp(prefix="weightflow-merge-limit-", dir="/tmp"))
    try:
        log(f"merge limit benchmark (size {args.size_gb} GB, {args.repeats} repeats, tmp {tmp}, "
            f"load {doc['load_average_at_start']})")
        doc["results"] = bench(tmp, args.size_gb, args.repeats, methods, not args.skip_mergekit, not args.no_check)
        print_summary(doc["results"])
    finally:
        if args.keep_tmp:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    doc["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return spine.finish(doc, started, args.out, log)


if __name__ == "__main__":
    raise SystemExit(main())
