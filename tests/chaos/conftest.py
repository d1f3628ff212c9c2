"""Fixtures of the chaos suite: tiny models, the reference run, and the figures every
test records (printed at the end of the session and written to bench-results/chaos.json).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from . import harness as h

RESULTS = h.REPO / "bench-results" / "chaos.json"
_FIGURES: dict[str, dict] = {}
_OUTCOMES: dict[str, str] = {}
_T0 = time.time()


@dataclass
class Reference:
    root: Path
    models: Path
    dir: Path            # pipeline dir of the clean run (pipeline.yaml, pipeline.lock, out/)
    store: Path
    lock_text: str
    lock: dict           # step -> (key, digest)
    exec_seconds: float  # first stderr line -> the export's line, in the clean child run
    child_seconds: float
    step_seconds: dict
    store_bytes: int
    lines: list          # (seconds, stderr line) of the clean child run

    def fresh_dir(self, name: str) -> Path:
        """A new pipeline directory with the pipeline file (no lock, no store)."""
        d = self.root / name
        if d.exists():
            shutil.rmtree(d)
        h.write_pipeline(d, self.models)
        return d

    def clone(self, name: str) -> Path:
        """A copy of the clean run: pipeline, lock, export and store (mtimes kept)."""
        d = self.root / name
        if d.exists():
            shutil.rmtree(d)
        shutil.copytree(self.dir, d, symlinks=True)
        return d


@pytest.fixture(scope="session")
def chaos_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("chaos")


@pytest.fixture(scope="session")
def reference(chaos_root):
    """Tiny models, then one clean `weightflow run` (a child process) in a fresh store."""
    import torch
    from conftest import perturbed_copy, save_tiny_llama  # tests/conftest.py

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores; the children get OMP_NUM_THREADS=1 too
    models = chaos_root / "models"
    base = save_tiny_llama(models / "base", seed=0, config=h.CHAOS_LLAMA)
    perturbed_copy(base, models / "ft_a", seed=1)
    perturbed_copy(base, models / "ft_b", seed=2)
    d = chaos_root / "reference"
    h.write_pipeline(d, models)
    store = d / "store"
    child = h.Child(["run", h.PIPELINE_NAME, "--cache-dir", store, "--json"], cwd=d)
    res = child.wait(timeout=600)
    assert res.rc == 0, res.describe()
    statuses = res.json()["steps"]
    assert {s["status"] for s in statuses} == {"executed"}, statuses
    first = res.lines[0][0] if res.lines else 0.0
    exported = [t for t, line in res.lines if line.startswith("exported ")]
    last = exported[-1] if exported else res.seconds
    lock_text = (d / h.LOCK_NAME).read_text()
    ref = Reference(root=chaos_root, models=models, dir=d, store=store, lock_text=lock_text,
                    lock=h.lock_digests(lock_text), exec_seconds=last - first,
                    child_seconds=res.seconds, step_seconds={s["name"]: s.get("seconds") for s in statuses},
                    store_bytes=h.tree_bytes(store), lines=res.lines)
    assert not h.check_all(d, store, lock_text), h.check_all(d, store, lock_text)
    # The suite resumes in-process (torch imported once); check that an in-process run in
    # a fresh store reproduces the child's lock byte for byte.
    d2 = ref.fresh_dir("reference-inprocess")
    r2 = h.wf(["run", h.PIPELINE_NAME, "--cache-dir", d2 / "store", "--json"], cwd=d2)
    assert r2.rc == 0, r2.describe()
    assert (d2 / h.LOCK_NAME).read_text() == lock_text, "in-process run differs from the child run"
    shutil.rmtree(d2)
    _FIGURES.setdefault("reference", {}).update(
        child_run_seconds=round(res.seconds, 2), exec_seconds=round(ref.exec_seconds, 2),
        in_process_run_seconds=round(r2.seconds, 2), steps=len(statuses),
        store_bytes=ref.store_bytes, step_seconds=ref.step_seconds)
    yield ref
    torch.set_num_threads(threads)


@pytest.fixture
def figures(request) -> dict:
    """What a test measured; printed at the end and written to bench-results/chaos.json."""
    fig: dict = {"seed": h.SEED}
    _FIGURES[request.node.name] = fig
    t0 = time.perf_counter()
    yield fig
    fig.setdefault("seconds", round(time.perf_counter() - t0, 1))


def pytest_runtest_logreport(report):
    if "chaos/" not in report.nodeid:
        return
    name = report.nodeid.split("::")[-1]
    if report.when == "call" or report.outcome != "passed":
        if _OUTCOMES.get(name) != "failed":
            _OUTCOMES[name] = report.outcome
        if report.outcome == "failed" and name in _FIGURES:
            crash = getattr(report.longrepr, "reprcrash", None)
            text = crash.message if crash is not None else str(report.longrepr)
            _FIGURES[name].setdefault("failure", text.strip()[:2000])


def _cpu_seconds() -> float:
    """User + system CPU of this process and its reaped children (the runs it started)."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def pytest_sessionfinish(session, exitstatus):
    if not _FIGURES:
        return
    try:
        doc = json.loads(RESULTS.read_text())
    except (OSError, ValueError):
        doc = {}
    tests = doc.get("tests", {})
    for name, fig in _FIGURES.items():
        tests[name] = {"outcome": _OUTCOMES.get(name, "fixture" if name == "reference" else "not run"), **fig}
    doc.update({
        "suite": "tests/chaos (make chaos)",
        "seed": h.SEED,
        "last_session_seconds": round(time.time() - _T0, 1),
        "last_session": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "last_session_cpu_seconds": round(_cpu_seconds(), 1),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "tests": tests,
    })
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")


def pytest_terminal_summary(terminalreporter):
    if not _FIGURES:
        return
    tr = terminalreporter
    tr.section("chaos figures")
    for name, fig in _FIGURES.items():
        outcome = _OUTCOMES.get(name, "fixture" if name == "reference" else "")
        short = {k: v for k, v in fig.items() if k not in ("cases", "trials_detail", "rounds_detail",
                                                            "step_seconds", "scenarios", "notes")}
        tr.write_line(f"{name} [{outcome}]: {json.dumps(short, sort_keys=True)}")
        for note in fig.get("notes", []):
            tr.write_line(f"    {note}")
    tr.write_line(f"(written to {RESULTS.relative_to(h.REPO)})")
