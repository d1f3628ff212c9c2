"""`weightflow gc` in a loop while a run is building a fresh store.

gc is told to keep only what the reference lock file names, with ``--older-than 0`` (the
most aggressive setting).  The run builds exactly those keys, so everything it makes
must survive: its staging directories (owned by a live process), objects renamed into
place whose action is not written yet (the mid-publish window), and finished entries.
Each round: the run exits 0, every gc call exits 0, and the store, lock and export
match the reference.
"""

from __future__ import annotations

import os
import shutil
import time

import pytest

from . import harness as h


@pytest.mark.chaos
def test_gc_during_a_run_removes_nothing_in_use(reference, figures):
    ref = reference
    rounds = int(os.environ.get("CHAOS_GC_ROUNDS", "3"))
    keep = ref.dir / h.LOCK_NAME
    details, failures = [], []
    t0 = time.perf_counter()
    for r in range(rounds):
        d = ref.fresh_dir(f"gc-race-{r}")
        store = d / "store"
        child = h.Child(["run", h.PIPELINE_NAME, "--cache-dir", store], cwd=d)
        calls, bad = 0, []
        while child.proc.poll() is None:
            g = h.wf(["gc", keep, "--older-than", "0", "--cache-dir", store, "--json"])
            calls += 1
            if g.rc != 0:
                bad.append(g.describe())
            time.sleep(0.05)
        res = child.wait()
        problems = [] if res.rc == 0 else [f"the run failed under gc: {res.describe()}"]
        problems += [f"gc failed: {b}" for b in bad[:3]]
        problems += h.check_all(d, store, ref.lock_text)
        rec = {"round": r, "run_rc": res.rc, "gc_calls": calls, "gc_failures": len(bad)}
        if problems:
            rec["problems"] = problems
            failures.append(rec)
        else:
            shutil.rmtree(d, ignore_errors=True)
        details.append(rec)
        print(f"round {r}: {calls} gc calls during the run, run rc {res.rc}; {problems if problems else 'OK'}")
    seconds = time.perf_counter() - t0
    figures.update(trials=rounds, failures=len(failures), seconds=round(seconds, 1),
                   gc_calls=sum(x["gc_calls"] for x in details), rounds_detail=details)
    assert not failures, "\n".join(f"round {x['round']}:\n  " + "\n  ".join(x["problems"]) for x in failures)
