"""Strict mode gives the same output bytes whatever the CPU's instruction sets and threads.

Other machines are stood in for on this one by the environment torch, MKL and oneDNN read
to choose their kernels (``ATEN_CPU_CAPABILITY``, ``MKL_CBWR``, ``MKL_ENABLE_INSTRUCTIONS``,
``ONEDNN_MAX_CPU_ISA``, ``OMP_NUM_THREADS``), by glibc's CPU features for its libm
(``GLIBC_TUNABLES``) and by a one-core CPU affinity (``taskset``).
Each environment runs the golden pipeline (tests/golden/pipeline.py: every op and method)
in a fresh subprocess and a fresh store, entered the way the CLI enters strict mode:
``weightflow.dsl.engine.repro.apply('strict')`` before torch is imported, ``configure_torch``
after.  The subprocess builds the input models itself (they are random, from seeds, made
with torch): their bytes are compared too.

The same file is the subprocess's program: ``python tests/test_reproducibility.py
--child MODE ROOT [STEP ...]`` prints ``{"inputs": {...}, "digests": {...}, ...}``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
GOLDEN = HERE / "golden"

#: Variables that choose kernels or threads; cleared in each child before its own are set,
#: so that the one running the tests cannot make two environments the same.
KNOBS = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS", "MKL_DYNAMIC", "MKL_NUM_THREADS",
         "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "OMP_NUM_THREADS", "OMP_DYNAMIC", "OMP_THREAD_LIMIT",
         "GLIBC_TUNABLES")

#: A subset of the golden steps for the fast tests: the ops whose bytes the ISA and the
#: threads changed when measured (fresh heads, ``init_seed``, full and LoRA fine-tunes of
#: both tasks, oneDNN's GELU in BERT), and a merge of their deltas.
FAST_STEPS = ("bert", "from_config", "ft_b", "clf", "clf_lora", "db", "pb")


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


FLAGS = _cpu_flags()
HAS_AVX2 = {"avx2", "fma"} <= FLAGS
HAS_AVX512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= FLAGS


def _child(mode: str, root: Path, steps: list[str]) -> None:
    from weightflow.dsl.engine import repro

    repro.apply(mode)  # before torch is imported, as the CLI does
    import torch

    repro.configure_torch(mode)
    sys.path.insert(0, str(GOLDEN))
    from pipeline import PIPELINE, build_inputs

    from weightflow.dsl.engine.runner import Runner
    from weightflow.dsl.lang.pipeline import load_pipeline
    from weightflow.dsl.store.content import Store

    data = root / "inputs"
    data.mkdir(parents=True)
    started = time.perf_counter()
    build_inputs(data)
    built = time.perf_counter()
    inputs = {str(p.relative_to(data)): hashlib.sha256(p.read_bytes()).hexdigest()
              for p in sorted(data.rglob("*")) if p.is_file()}
    (data / "golden.yaml").write_text(PIPELINE)
    outcome = Runner(load_pipeline(data / "golden.yaml"), Store(root / "cache"), targets=steps,
                     log=lambda m: None).run()
    print(json.dumps({"inputs": inputs, "digests": {s.name: s.digest for s in outcome.steps if s.digest},
                      "capability": torch.backends.cpu.get_cpu_capability(),
                      "threads": torch.get_num_threads(), "platform": repro.platform_class(mode),
                      "overridden": repro.override_warning(),
                      "seconds": {"build_inputs": round(built - started, 3),
                                  "pipeline": round(time.perf_counter() - built, 3)}}))


def run_in(env: dict[str, str], mode: str, root: Path, steps=(), affinity: str | None = None) -> dict:
    """The golden pipeline (or ``steps`` and what they need) in a subprocess under ``env``."""
    child_env = {k: v for k, v in os.environ.items() if k not in KNOBS}
    child_env.update(env)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, str(root), *steps]
    if affinity is not None:
        cmd = ["taskset", "-c", affinity, *cmd]
    proc = subprocess.run(cmd, env=child_env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"child under {env} failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _differences(results: dict[str, dict]) -> list[str]:
    """Lines naming each input file and step whose bytes differ from the first environment's."""
    names = list(results)
    ref = results[names[0]]
    out = []
    for name in names[1:]:
        got = results[name]
        for what in ("inputs", "digests"):
            assert set(got[what]) == set(ref[what]), (name, what)
            for item in ref[what]:
                if got[what][item] != ref[what][item]:
                    out.append(f"{what[:-1]} {item}: {names[0]} {ref[what][item][:12]} vs "
                               f"{name} {got[what][item][:12]}")
    return out


def _envs_full() -> dict[str, tuple[dict, str | None]]:
    """Every value of every knob (one at a time from the machine's defaults), a one-core
    affinity, and one environment with all of them changed at once."""
    envs: dict[str, tuple[dict, str | None]] = {"machine defaults": ({}, None)}
    caps = ["default"] + (["avx2"] if HAS_AVX2 else []) + (["avx512"] if HAS_AVX512 else [])
    for cap in caps:
        envs[f"ATEN_CPU_CAPABILITY={cap}"] = ({"ATEN_CPU_CAPABILITY": cap}, None)
    for n in ("1", "2", "4"):
        envs[f"OMP_NUM_THREADS={n}"] = ({"OMP_NUM_THREADS": n}, None)
    envs["ONEDNN_MAX_CPU_ISA=AVX2"] = ({"ONEDNN_MAX_CPU_ISA": "AVX2"}, None)
    envs["ONEDNN_MAX_CPU_ISA=SSE41"] = ({"ONEDNN_MAX_CPU_ISA": "SSE41"}, None)
    envs["MKL_CBWR=COMPATIBLE"] = ({"MKL_CBWR": "COMPATIBLE"}, None)
    envs["MKL_CBWR=AVX2"] = ({"MKL_CBWR": "AVX2"}, None)
    envs["MKL_ENABLE_INSTRUCTIONS=AVX2"] = ({"MKL_ENABLE_INSTRUCTIONS": "AVX2"}, None)
    # glibc's libm picks FMA/AVX2 variants of exp, sin, cos, pow... by CPU (Python's math
    # differs in ~0.05% of last bits without them): a CPU without FMA, for the C library
    envs["libm without FMA/AVX"] = ({"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX2,-FMA,-AVX,-AVX512F"}, None)
    if shutil.which("taskset"):
        envs["one core (taskset -c 0)"] = ({}, "0")
    envs["all changed"] = ({"ATEN_CPU_CAPABILITY": caps[-1], "OMP_NUM_THREADS": "4", "ONEDNN_MAX_CPU_ISA": "AVX2",
                            "MKL_CBWR": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "MKL_DYNAMIC": "TRUE",
                            "OMP_DYNAMIC": "TRUE"}, None)
    if os.environ.get("WEIGHTFLOW_REPRO_FULL_MATRIX"):  # the whole product as well (36 more)
        for cap in caps:
            for n in ("1", "2", "4"):
                for isa in ("AVX2", None):
                    for cbwr in (None, "AVX2"):
                        env = {"ATEN_CPU_CAPABILITY": cap, "OMP_NUM_THREADS": n}
                        env.update({"ONEDNN_MAX_CPU_ISA": isa} if isa else {})
                        env.update({"MKL_CBWR": cbwr} if cbwr else {})
                        envs[" ".join(f"{k}={v}" for k, v in env.items())] = (env, None)
    return envs


# -- the tests ---------------------------------------------------------------------------

@pytest.mark.slow
def test_strict_golden_digests_identical_in_every_environment(tmp_path):
    """All 37 golden steps and the input models, in 15 environments on an AVX-512 CPU (5 min on 2
    cores; WEIGHTFLOW_REPRO_FULL_MATRIX=1 adds every combination of the knobs)."""
    results = {name: run_in(env, "strict", tmp_path / f"env{i}", affinity=affinity)
               for i, (name, (env, affinity)) in enumerate(_envs_full().items())}
    assert all(r["capability"] == "DEFAULT" for r in results.values())
    assert len(next(iter(results.values()))["digests"]) >= 37
    differences = _differences(results)
    assert not differences, "strict mode gave different bytes:\n  " + "\n  ".join(differences)


def _two_envs() -> dict[str, dict]:
    """Two environments as far apart as this CPU allows: the best ATen ISA, 2 threads and
    oneDNN's best ISA, against ATen's AVX2 (or default) kernels, one thread, oneDNN at AVX2
    and MKL's compatible path."""
    low = "avx2" if HAS_AVX512 else "default"
    return {"machine, 2 threads": {"OMP_NUM_THREADS": "2"},
            f"{low}, 1 thread": {"ATEN_CPU_CAPABILITY": low, "OMP_NUM_THREADS": "1",
                                  "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "COMPATIBLE"}}


@pytest.mark.slow  # every fast run already compares strict golden digests recorded on another setup
def test_strict_digests_identical_across_isa_and_threads(tmp_path):
    results = {name: run_in(env, "strict", tmp_path / f"env{i}", FAST_STEPS)
               for i, (name, env) in enumerate(_two_envs().items())}
    assert all(r["capability"] == "DEFAULT" and r["platform"] == "cpu-strict" for r in results.values())
    assert set(FAST_STEPS) <= set(next(iter(results.values()))["digests"])
    differences = _differences(results)
    assert not differences, "strict mode gave different bytes:\n  " + "\n  ".join(differences)
    # the second environment's user settings were overridden, and said so
    assert "ATEN_CPU_CAPABILITY" in (list(results.values())[1]["overridden"] or "")


@pytest.mark.slow  # the slow matrix; the fast strict test above is the one every run keeps
@pytest.mark.skipif(not HAS_AVX2, reason="needs a CPU with AVX2 for two ATen kernel sets")
def test_without_strict_the_environment_changes_digests(tmp_path):
    """The check above can fail: in platform mode the same environments give other bytes."""
    results = {name: run_in(env, "platform", tmp_path / f"env{i}", FAST_STEPS)
               for i, (name, env) in enumerate(_two_envs().items())}
    assert len({r["capability"] for r in results.values()}) == 2
    assert _differences(results), "platform mode gave identical bytes across ISAs and threads"


def test_apply_strict_overrides_and_reports(monkeypatch):
    from weightflow.dsl.engine import repro

    env = {"ATEN_CPU_CAPABILITY": "avx512", "MKL_CBWR": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
           "OMP_NUM_THREADS": str(repro.STRICT_THREADS), "HOME": "/root"}
    over = repro.apply("strict", env)
    for name, value in repro.STRICT_ENV.items():
        assert env[name] == value
    assert "MKL_ENABLE_INSTRUCTIONS" not in env and env["HOME"] == "/root"
    assert over == {"ATEN_CPU_CAPABILITY": ("avx512", "default"), "MKL_CBWR": ("AVX2", "COMPATIBLE,STRICT"),
                    "MKL_ENABLE_INSTRUCTIONS": ("AVX2", None)}
    assert "ATEN_CPU_CAPABILITY=avx512 -> default" in repro.override_warning()
    assert repro.platform_class("strict") == "cpu-strict"
    env2 = {"ATEN_CPU_CAPABILITY": "avx2"}
    assert repro.apply("platform", env2) == {} and env2 == {"ATEN_CPU_CAPABILITY": "avx2"}
    assert repro.override_warning() is None
    with pytest.raises(ValueError):
        repro.apply("fast", {})


def test_platform_class_names_isa_threads_and_torch():
    from weightflow.dsl.engine import repro

    avx512 = {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq"}
    assert repro.aten_isa(avx512, {}) == "avx512"
    assert repro.aten_isa(avx512, {"ATEN_CPU_CAPABILITY": "avx2"}) == "avx2"
    assert repro.aten_isa({"avx2", "fma"}, {"ATEN_CPU_CAPABILITY": "avx512"}) == "avx2"
    assert repro.aten_isa({"sse4_2"}, {}) == "default"
    text = repro.platform_class("platform", environ={"OMP_NUM_THREADS": "1", "MKL_CBWR": "COMPATIBLE"})
    assert text.startswith("cpu ") and " torch " in text and "mkl_cbwr=COMPATIBLE" in text
    if "torch" not in sys.modules:
        assert " 1 thread " in text


if __name__ == "__main__" and len(sys.argv) >= 4 and sys.argv[1] == "--child":
    _child(sys.argv[2], Path(sys.argv[3]), sys.argv[4:])
