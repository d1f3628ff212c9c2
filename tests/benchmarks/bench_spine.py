"""Spine benchmark: no-op rerun latency, streaming-merge peak memory, hashing throughput.

Run it as a script (it is not a pytest test; pytest only collects ``test_*.py``)::

    .venv/bin/python tests/benchmarks/bench_spine.py [--size-gb 1.0] [--out bench-results/spine.json]

What it measures
1. No-op rerun of a 10-step pipeline on tiny llama models (loads, extract-deltas,
   linear and task-arithmetic merges): the wall time of ``weightflow run -q`` as a
   subprocess (median of 3, every step cached), and of ``Runner(...).run()`` in a
   warm process.
2. Peak RSS of streaming ops on three synthetic llama-shaped float32 checkpoints of
   about ``--size-gb`` GB each (written shard by shard with safetensors, so this
   script never holds a whole model): load of one model, a linear merge of the three,
   an extract-delta and a task-arithmetic merge of two deltas.  Every measured step
   runs in its own ``weightflow run --target STEP`` subprocess whose inputs are
   already cached, so only that step executes; peak RSS is the kernel high-water
   mark of the child (``wait4`` rusage), cross-checked by polling ``/proc`` every
   20 ms (which also splits anonymous memory from memory-mapped file pages).  The
   RSS of a process that only imports torch and the ops is reported as the baseline.
3. Hashing throughput of ``hash_file`` on a ``--size-gb`` random file (page cache
   warm), first-time through a fresh memo, and memoised (second call).

Units: MB = 1e6 bytes, GB = 1e9 bytes.  Everything is written under a temporary
directory in /tmp that is removed at the end (``--keep-tmp`` keeps it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

MB = 1e6
GB = 1e9
POLL_S = 0.02
STEP_TIMEOUT_S = 600


# -- synthetic llama checkpoints ------------------------------------------------

def llama_geometry(size_bytes: float, hidden: int | None = None) -> dict:
    """A LlamaForCausalLM config (float32, untied head) whose weights total about ``size_bytes``."""
    if hidden is None:
        hidden = 2048 if size_bytes >= 0.5 * GB else (1024 if size_bytes >= 0.1 * GB else 512)
    inter = {2048: 5632, 1024: 2816, 512: 1408, 256: 688}.get(hidden, int(hidden * 2.75) // 64 * 64)
    head_dim = 64 if hidden <= 512 else 128
    heads = hidden // head_dim
    per_layer = 4 * (4 * hidden * hidden + 3 * hidden * inter + 2 * hidden)
    layers = max(1, int(0.6 * size_bytes // per_layer))
    emb_bytes = max(size_bytes - layers * per_layer - 4 * hidden, 0)
    vocab = max(256, int(emb_bytes // (2 * hidden * 4)) // 64 * 64)
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": heads, "head_dim": head_dim,
        "vocab_size": vocab, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
    }


def llama_shards(cfg: dict) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Tensor names and shapes as transformers' LlamaForCausalLM names them, one shard per layer."""
    h, i, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    q = cfg["num_attention_heads"] * cfg["head_dim"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    shards = [[("model.embed_tokens.weight", (cfg["vocab_size"], h))]]
    for n in range(L):
        p = f"model.layers.{n}."
        shards.append([
            (p + "self_attn.q_proj.weight", (q, h)), (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, q)),
            (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
            (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
        ])
    shards.append([("model.norm.weight", (h,)), ("lm_head.weight", (cfg["vocab_size"], h))])
    return shards


def write_llama_dir(path: Path, cfg: dict, seed: int) -> int:
    """Write a sharded safetensors model directory, one shard in memory at a time."""
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    shards = llama_shards(cfg)
    n = len(shards)
    weight_map, total = {}, 0
    for k, tensors in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        data = {}
        for name, shape in tensors:
            if len(shape) == 1:
                data[name] = torch.ones(shape) + 0.01 * torch.randn(shape, generator=g)
            else:
                data[name] = 0.02 * torch.randn(shape, generator=g)
            total += data[name].numel() * 4
            weight_map[name] = fname
        save_file(data, str(path / fname), metadata={"format": "pt"})
        del data
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    (path / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return total


# -- subprocess measurement -----------------------------------------------------

def _proc_status(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM"):
                    out[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return out


# A small launcher between this (large) process and the measured command.  The
# kernel's ru_maxrss of a child counts the address space the child had before its
# exec: for a child spawned straight from this process (vfork/fork), that is this
# process's own peak (hundreds of MB after writing checkpoints).  Forked from this
# ~10 MB launcher instead, the measured command's ru_maxrss is its own.
LAUNCHER = textwrap.dedent("""\
    import os, sys
    pid = os.fork()
    if pid == 0:
        try:
            os.execvp(sys.argv[2], sys.argv[2:])
        finally:
            os._exit(127)
    _, status, usage = os.wait4(pid, 0)
    with open(sys.argv[1], "w") as fh:
        fh.write(str(usage.ru_maxrss * 1024))  # Linux reports KiB
    code = os.waitstatus_to_exitcode(status)
    sys.exit(code if code >= 0 else 128 - code)
""")


def measured_run(cmd: list[str], cwd: Path | None = None, timeout: float = STEP_TIMEOUT_S,
                 poll: bool = True) -> dict:
    """Run ``cmd``; return wall time, exit code, output and (``poll=True``) its peak memory.

    ``peak_rss`` is the kernel high-water mark of the command's process (its rusage,
    taken through ``LAUNCHER``); ``poll_*`` are maxima of 20 ms samples of
    ``/proc/PID/status`` (RssAnon: heap, i.e. tensors; RssFile: mapped file pages,
    i.e. shared libraries and memory-mapped checkpoints) and of the whole process tree
    via psutil.  ``poll=False`` is for timings: no launcher and no polling (polling
    ``/proc`` slows a starting process down measurably on a small machine).
    """
    import psutil

    with tempfile.TemporaryDirectory() as scratch:
        rss_file = Path(scratch) / "maxrss"
        full = [sys.executable, "-c", LAUNCHER, str(rss_file), *cmd] if poll else list(cmd)
        with open(Path(scratch) / "out", "w+b") as out, open(Path(scratch) / "err", "w+b") as err:
            t0 = time.perf_counter()
            proc = subprocess.Popen(full, cwd=cwd, stdout=out, stderr=err)
            timer = threading.Timer(timeout, proc.kill)
            timer.start()
            peak = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0, "tree": 0}
            try:
                if poll:
                    launcher = psutil.Process(proc.pid)
                    target = None
                    while proc.poll() is None:
                        try:
                            if target is None:
                                kids = launcher.children()
                                target = kids[0].pid if kids else None
                            tree = launcher.memory_info().rss + sum(
                                c.memory_info().rss for c in launcher.children(recursive=True))
                            peak["tree"] = max(peak["tree"], tree)
                        except psutil.Error:
                            pass
                        if target is not None:
                            st = _proc_status(target)
                            for k in ("VmRSS", "RssAnon", "RssFile"):
                                peak[k] = max(peak[k], st.get(k, 0))
                        time.sleep(POLL_S)
                else:
                    proc.wait()
            finally:
                timer.cancel()
            wall = time.perf_counter() - t0
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
        try:
            peak_rss = int(rss_file.read_text()) if poll else None
        except (OSError, ValueError):
            peak_rss = None
    return {
        "cmd": cmd, "rc": proc.returncode, "wall_s": wall, "stdout": stdout, "stderr": stderr,
        "peak_rss": peak_rss, "poll_rss": peak["VmRSS"], "poll_anon": peak["RssAnon"],
        "poll_file": peak["RssFile"], "poll_tree": peak["tree"],
    }


def _check(res: dict, what: str) -> dict:
    if res["rc"] != 0:
        raise SystemExit(f"{what} failed (exit {res['rc']}): {' '.join(map(str, res['cmd']))}\n"
                         f"{res['stderr'][-4000:]}")
    return res


def _statuses(res: dict) -> dict[str, dict]:
    doc = json.loads(res["stdout"])
    return {s["name"]: s for s in doc["steps"]}


def _cli() -> list[str]:
    exe = Path(sys.executable).parent / "weightflow"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("weightflow")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from weightflow.dsl.cli import main; sys.exit(main())"]


def wf_run(pipeline: Path, cache: Path, *extra: str, json_out: bool = True, poll: bool = True) -> dict:
    cmd = _cli() + ["run", str(pipeline), "-q", "--cache-dir", str(cache), *extra]
    if json_out:
        cmd.append("--json")
    return _check(measured_run(cmd, cwd=pipeline.parent, poll=poll), f"weightflow run {' '.join(extra)}")


def _mb(n: float) -> float:
    return round(n / MB, 1)


# -- 1. no-op rerun -------------------------------------------------------------

SPINE_PIPELINE = """\
weightflow: 1
name: bench-spine-noop
seed: 0
steps:
  base:    {op: load, source: ./models/base}
  ft_a:    {op: load, source: ./models/ft_a}
  ft_b:    {op: load, source: ./models/ft_b}
  scratch: {op: load, config: {model_type: llama, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2,
                               num_attention_heads: 4, num_key_value_heads: 2, vocab_size: 256}, init_seed: 3}
  delta_a: {op: extract-delta, model: ft_a, base: base}
  delta_b: {op: extract-delta, model: ft_b, base: base}
  ta:      {op: merge, method: task-arithmetic, base: base, deltas: [delta_a, delta_b], weights: [0.5, 0.5]}
  lin:     {op: merge, method: linear, models: [base, ft_a, ft_b], weights: [1, 2, 1], normalize: true}
  neg:     {op: merge, method: task-arithmetic, base: ta, deltas: [delta_b], weights: [-1.0]}
  delta_m: {op: extract-delta, model: lin, base: base}
"""

INPROCESS_SCRIPT = textwrap.dedent("""\
    import json, sys, time
    t0 = time.perf_counter()
    from weightflow.dsl.engine.runner import Runner
    from weightflow.dsl.lang.pipeline import load_pipeline
    from weightflow.dsl.store.content import Store
    t_import = time.perf_counter() - t0
    path, cache, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    times, statuses = [], []
    for _ in range(n):
        t = time.perf_counter()
        outcome = Runner(load_pipeline(path), Store(cache), log=lambda m: None).run()
        times.append(time.perf_counter() - t)
        statuses.append(sorted({s.status for s in outcome.steps}))
    print(json.dumps({"import_s": t_import, "times_s": times, "statuses": statuses,
                      "torch_imported": "torch" in sys.modules}))
""")


def bench_noop(work: Path, repeats: int = 3) -> dict:
    tiny = llama_geometry(0, hidden=256)
    tiny.update(num_hidden_layers=2, vocab_size=1024)
    models = work / "models"
    for seed, name in enumerate(["base", "ft_a", "ft_b"]):
        write_llama_dir(models / name, tiny, seed)
    pipeline = work / "spine.yaml"
    pipeline.write_text(SPINE_PIPELINE)
    cache = work / "cache"
    first = wf_run(pipeline, cache)
    st = _statuses(first)
    assert len(st) == 10 and all(s["status"] == "executed" for s in st.values()), st
    check = wf_run(pipeline, cache)
    st = _statuses(check)
    assert all(s["status"] == "cached" for s in st.values()), st

    cli_times = [wf_run(pipeline, cache, json_out=False, poll=False)["wall_s"] for _ in range(repeats)]
    validate = [_check(measured_run(_cli() + ["validate", str(pipeline)], poll=False), "validate")["wall_s"]
                for _ in range(repeats)]
    res = _check(measured_run([sys.executable, "-c", INPROCESS_SCRIPT, str(pipeline), str(cache),
                               str(repeats + 1)], poll=False), "in-process Runner")
    inproc = json.loads(res["stdout"].strip().splitlines()[-1])
    assert all(s == ["cached"] for s in inproc["statuses"]), inproc
    warm = inproc["times_s"][1:]
    return {
        "steps": 10,
        "first_run_cli_s": round(first["wall_s"], 3),
        "noop_rerun_cli_s_median": round(statistics.median(cli_times), 3),
        "noop_rerun_cli_s_all": [round(t, 3) for t in cli_times],
        "validate_cli_s_median": round(statistics.median(validate), 3),
        "noop_rerun_inprocess_s_first": round(inproc["times_s"][0], 4),
        "noop_rerun_inprocess_s_median_warm": round(statistics.median(warm), 4),
        "inprocess_import_s": round(inproc["import_s"], 3),
        "torch_imported_by_noop_rerun": inproc["torch_imported"],
        "noop_rerun_cli_peak_rss_mb": _mb(check["peak_rss"]),
    }


# -- 2. peak RSS of streaming ops ----------------------------------------------

RSS_PIPELINE = """\
weightflow: 1
name: bench-spine-rss
seed: 0
steps:
  m0:  {op: load, source: ./m0}
  m1:  {op: load, source: ./m1}
  m2:  {op: load, source: ./m2}
  lin: {op: merge, method: linear, models: [m0, m1, m2]}
  d1:  {op: extract-delta, model: m1, base: m0}
  d2:  {op: extract-delta, model: m2, base: m0}
  ta:  {op: merge, method: task-arithmetic, base: m0, deltas: [d1, d2], weights: [0.5, 0.5]}
"""

BASELINE_SCRIPT = ("import torch, safetensors.torch, weightflow.dsl.engine.runner, weightflow.ops.load, "
                   "weightflow.ops.merge, weightflow.ops.extract_delta, weightflow.ops.lib.tensors")


def bench_rss(work: Path, size_gb: float, log) -> dict:
    cfg = llama_geometry(size_gb * GB)
    t = time.perf_counter()
    sizes = [write_llama_dir(work / f"m{k}", cfg, seed=100 + k) for k in range(3)]
    size = sizes[0]
    log(f"  wrote 3 synthetic llama checkpoints of {_mb(size)} MB each "
        f"(hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, vocab {cfg['vocab_size']}, "
        f"{len(llama_shards(cfg))} shards) in {time.perf_counter() - t:.1f}s")
    pipeline = work / "rss.yaml"
    pipeline.write_text(RSS_PIPELINE)
    cache = work / "cache"

    baseline = _check(measured_run([sys.executable, "-c", BASELINE_SCRIPT]), "baseline import")
    largest = max(4 * math.prod(shape) for shard in llama_shards(cfg) for _, shape in shard)
    results: dict = {
        "model_bytes_S_mb": _mb(size),
        "largest_tensor_mb": _mb(largest),
        "model_config": {k: cfg[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                              "vocab_size")},
        "baseline_import_torch_and_ops_rss_mb": _mb(baseline["peak_rss"]),
        "baseline_poll_anon_mb": _mb(baseline["poll_anon"]),
        "baseline_poll_file_mapped_mb": _mb(baseline["poll_file"]),
        "steps": {},
    }

    def step(target: str, executes: set[str], label: str) -> None:
        res = wf_run(pipeline, cache, "--target", target)
        st = _statuses(res)
        ran = {n for n, s in st.items() if s["status"] == "executed"}
        assert ran == executes, f"--target {target}: expected {executes} to execute, got {ran}"
        secs = sum(st[n].get("seconds") or 0 for n in executes)
        results["steps"][target] = {
            "what": label,
            "executed": sorted(ran),
            "wall_s": round(res["wall_s"], 2),
            "step_s": round(secs, 2),
            "peak_rss_mb": _mb(res["peak_rss"]),
            "peak_rss_over_S": round(res["peak_rss"] / size, 3),
            "peak_rss_minus_baseline_mb": _mb(res["peak_rss"] - baseline["peak_rss"]),
            "peak_rss_minus_baseline_over_S": round((res["peak_rss"] - baseline["peak_rss"]) / size, 3),
            "anon_above_baseline_mb": _mb(res["poll_anon"] - baseline["poll_anon"]),
            "anon_above_baseline_over_S": round((res["poll_anon"] - baseline["poll_anon"]) / size, 3),
            "anon_above_baseline_over_largest_tensor": round(
                (res["poll_anon"] - baseline["poll_anon"]) / largest, 2),
            "poll_peak_rss_mb": _mb(res["poll_rss"]),
            "poll_peak_anon_mb": _mb(res["poll_anon"]),
            "poll_peak_file_mapped_mb": _mb(res["poll_file"]),
            "poll_peak_tree_rss_mb": _mb(res["poll_tree"]),
        }
        r = results["steps"][target]
        log(f"  {target:<4} {label:<46} {r['step_s']:6.2f}s  peak RSS {r['peak_rss_mb']:8.1f} MB "
            f"= {r['peak_rss_over_S']:.2f} x S  (anon {r['poll_peak_anon_mb']:.0f} MB, "
            f"file-mapped {r['poll_peak_file_mapped_mb']:.0f} MB)")

    step("m0", {"m0"}, "load one model (incl. first hash of its files)")
    step("m2", {"m2"}, "load one model (incl. first hash of its files)")
    step("m1", {"m1"}, "load one model (incl. first hash of its files)")
    step("lin", {"lin"}, "merge linear of 3 models")
    step("d1", {"d1"}, "extract-delta (model - base)")
    step("d2", {"d2"}, "extract-delta (model - base)")
    step("ta", {"ta"}, "merge task-arithmetic: base + 2 deltas")
    noop = wf_run(pipeline, cache)
    assert all(s["status"] == "cached" for s in _statuses(noop).values())
    times = [wf_run(pipeline, cache, json_out=False, poll=False)["wall_s"] for _ in range(3)]
    results["noop_rerun_7_steps_cli_s"] = round(statistics.median(times), 3)
    results["noop_rerun_7_steps_peak_rss_mb"] = _mb(noop["peak_rss"])
    return results


# -- 3. hashing -----------------------------------------------------------------

def bench_hash(work: Path, size_gb: float) -> dict:
    import numpy as np

    from weightflow.dsl.format.checkpoint import hash_file
    from weightflow.dsl.store.content import Store

    work.mkdir(parents=True, exist_ok=True)
    path = work / "random.bin"
    n = int(size_gb * GB)
    rng = np.random.default_rng(0)
    chunk = 64 << 20
    with open(path, "wb") as fh:
        left = n
        while left > 0:
            fh.write(rng.bytes(min(chunk, left)))
            left -= chunk
    size = path.stat().st_size
    store = Store(work / "hash-store")  # fresh memo
    t = time.perf_counter()
    d_first = store.memo.file_digest(path)
    first = time.perf_counter() - t
    t = time.perf_counter()
    d_memo = store.memo.file_digest(path)
    memo = time.perf_counter() - t
    raw = []
    for _ in range(3):
        t = time.perf_counter()
        d_raw = hash_file(path)
        raw.append(time.perf_counter() - t)
    assert d_first == d_memo == d_raw
    return {
        "file_mb": _mb(size),
        "first_hash_via_fresh_memo_s": round(first, 3),
        "first_hash_via_fresh_memo_gb_s": round(size / first / GB, 2),
        "memoised_digest_ms": round(memo * 1e3, 3),
        "memoised_digest_gb_s": round(size / memo / GB, 1),
        "hash_file_s_median_of_3": round(statistics.median(raw), 3),
        "hash_file_gb_s_median_of_3": round(size / statistics.median(raw) / GB, 2),
        "page_cache": "warm (file just written)",
    }


# -- main -------------------------------------------------------------------------

def _git_state() -> dict:
    """The library version measured: HEAD and the files that differ from it."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        head, dirty = "", []
    files = {}  # the library code as it is on disk, committed or not
    for f in sorted(list(root.glob("dsl/**/*.py")) + list(root.glob("ops/**/*.py"))):
        files[f.relative_to(root).as_posix()] = hashlib.sha256(f.read_bytes()).hexdigest()
    lib = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]
    return {"head": head, "modified": sorted(line[3:] for line in dirty if line.strip()),
            "library_sha256": lib, "_files": files}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, default=1.0, help="size S of each synthetic model (GB)")
    ap.add_argument("--out", default="bench-results/spine.json", help="JSON results file")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temporary directory")
    args = ap.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, flush=True)

    started = time.perf_counter()
    import blake3
    import psutil
    import safetensors
    import torch

    doc: dict = {
        "benchmark": "spine",
        "units": "MB = 1e6 bytes, GB = 1e9 bytes; RSS = resident set size",
        "size_gb": args.size_gb,
        "git": _git_state(),
        "machine": {"cpus": os.cpu_count(), "ram_gb": round(psutil.virtual_memory().total / GB, 1),
                    "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "safetensors": safetensors.__version__,
                    "blake3": blake3.__version__},
    }
    tmp = Path(tempfile.mkdtemp(prefix="weightflow-bench-", dir="/tmp"))
    try:
        log(f"weightflow spine benchmark (size {args.size_gb} GB, tmp {tmp})")
        log("1. no-op rerun of a 10-step pipeline (tiny llama models)")
        r = doc["noop_rerun"] = bench_noop(tmp / "noop")
        log(f"  first run (CLI, 10 steps executed)       {r['first_run_cli_s']:.3f} s")
        log(f"  no-op rerun, CLI subprocess, median of 3  {r['noop_rerun_cli_s_median']:.3f} s  "
            f"(all: {r['noop_rerun_cli_s_all']})")
        log(f"  `weightflow validate` (startup floor)     {r['validate_cli_s_median']:.3f} s")
        log(f"  no-op rerun, in-process Runner.run()      {r['noop_rerun_inprocess_s_first'] * 1e3:.1f} ms "
            f"first, {r['noop_rerun_inprocess_s_median_warm'] * 1e3:.1f} ms warm (median)")
        log(f"  torch imported by a no-op rerun: {r['torch_imported_by_noop_rerun']}; "
            f"CLI no-op peak RSS {r['noop_rerun_cli_peak_rss_mb']} MB")

        log(f"2. peak RSS of streaming ops on ~{args.size_gb} GB float32 llama checkpoints")
        r = doc["rss"] = bench_rss(tmp / "rss", args.size_gb, log)
        log(f"  S (one model) = {r['model_bytes_S_mb']} MB; baseline (python + torch + ops imported) "
            f"= {r['baseline_import_torch_and_ops_rss_mb']} MB (anon {r['baseline_poll_anon_mb']:.0f} MB, "
            f"file-mapped {r['baseline_poll_file_mapped_mb']:.0f} MB)")
        lin = r["steps"]["lin"]
        log(f"  merge linear x3: peak RSS {lin['peak_rss_mb']} MB = {lin['peak_rss_over_S']} x S; "
            f"above baseline {lin['peak_rss_minus_baseline_mb']} MB = "
            f"{lin['peak_rss_minus_baseline_over_S']} x S")
        log(f"    of which anonymous (tensors) above baseline: {lin['anon_above_baseline_mb']} MB = "
            f"{lin['anon_above_baseline_over_S']} x S = {lin['anon_above_baseline_over_largest_tensor']} x "
            f"the largest tensor ({r['largest_tensor_mb']} MB); the rest is checkpoint pages mapped "
            f"from the page cache (RssFile)")
        log(f"  no-op rerun of this 7-step pipeline (3 x S of sources), CLI, median of 3: "
            f"{r['noop_rerun_7_steps_cli_s']:.3f} s (peak RSS {r['noop_rerun_7_steps_peak_rss_mb']} MB)")

        log("3. hashing throughput")
        r = doc["hash"] = bench_hash(tmp / "hash", args.size_gb)
        log(f"  first hash via fresh memo  {r['first_hash_via_fresh_memo_gb_s']:.2f} GB/s "
            f"({r['first_hash_via_fresh_memo_s']:.3f} s for {r['file_mb']} MB, page cache warm)")
        log(f"  hash_file, median of 3      {r['hash_file_gb_s_median_of_3']:.2f} GB/s "
            f"({r['hash_file_s_median_of_3']:.3f} s)")
        log(f"  memoised digest             {r['memoised_digest_ms']:.3f} ms "
            f"(= {r['memoised_digest_gb_s']:.0f} GB/s equivalent)")
    finally:
        if args.keep_tmp:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return finish(doc, started, args.out, log)


def finish(doc: dict, started: float, out: str, log) -> int:
    """Warn if the library changed mid-run, write the JSON results, print the total."""
    doc["total_s"] = round(time.perf_counter() - started, 1)
    # the vector ISA ATen ran with: platform-mode figures differ between AVX2 and AVX-512 machines
    from weightflow.dsl.engine import repro

    doc.setdefault("machine", {}).setdefault("aten_isa", repro.aten_isa())
    before, after = doc["git"].pop("_files", {}), _git_state().get("_files", {})
    changed = sorted(f for f in set(before) | set(after) if before.get(f) != after.get(f))
    if changed:
        doc["warning"] = (f"library files changed while the benchmark ran ({', '.join(changed)}): "
                          "figures may mix versions")
        log(f"warning: {doc['warning']}")
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    log(f"total {doc['total_s']} s; results written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
