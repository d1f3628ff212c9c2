"""Four `weightflow run --json` processes at once on one pipeline and one store.

Five rounds, each with a fresh store and pipeline directory; the first starts the four
at once, the others at seeded staggered moments within 4 s.  In every round: all four
exit 0; each step key is reported "executed" by exactly one of them (the others report it
cached, computed by a concurrent run); every process reports the reference key and digest
for every step; the one lock file equals the clean reference; the store at rest is sound
(every object re-hashes to its name, no staging directory left); and the export (written
by all four onto the same directory) is complete, with no debris beside it.
"""

from __future__ import annotations

import collections
import os
import random
import re
import shutil
import time

import pytest

from . import harness as h

DONE = re.compile(r"\[\d+/\d+\] (\S+) \(\S+\): done in")
N_PROCS = 4


@pytest.mark.chaos
def test_four_concurrent_runs_share_one_store(  # noqa: C901  (one scenario, checked step by step)
    reference, figures):
    ref = reference
    rounds = int(os.environ.get("CHAOS_CONCURRENT_ROUNDS", "5"))
    rng = random.Random(h.SEED + 1)
    details, failures = [], []
    t0 = time.perf_counter()
    for r in range(rounds):
        d = ref.fresh_dir(f"concurrent-{r}")
        store = d / "store"
        # round 0 starts all four at once; later rounds stagger the starts (seeded, up to
        # 4 s) so a process starts -- and cleans stale staging -- while others are mid-step
        starts = [0.0] * N_PROCS if r == 0 else sorted(rng.uniform(0, 4.0) for _ in range(N_PROCS))
        children = []
        t_round = time.perf_counter()
        for i, at in enumerate(starts):
            time.sleep(max(0.0, at - (time.perf_counter() - t_round)))
            children.append(h.Child(["run", h.PIPELINE_NAME, "--cache-dir", store, "--json"], cwd=d,
                                    module=bool(i % 2)))
        results = [c.wait(timeout=600) for c in children]
        problems = []
        executed = collections.Counter()
        for i, res in enumerate(results):
            if res.rc != 0:
                problems.append(f"process {i}: {res.describe()}")
            statuses = res.statuses()
            if statuses:
                for name, (status, key, digest) in statuses.items():
                    if status == "executed":
                        executed[name] += 1
                    if (key, digest) != ref.lock[name]:
                        problems.append(f"process {i}: step {name} reports key/digest "
                                        f"{str(key)[:12]}/{str(digest)[:12]}, reference "
                                        f"{ref.lock[name][0][:12]}/{ref.lock[name][1][:12]}")
            else:  # no JSON (it failed): count from its progress lines
                for _, line in res.lines:
                    m = DONE.search(line)
                    if m:
                        executed[m.group(1)] += 1
        wrong = {n: executed.get(n, 0) for n in ref.lock if executed.get(n, 0) != 1}
        if wrong:
            problems.append(f"steps not executed exactly once across the {N_PROCS} processes: {wrong}")
        problems += h.check_all(d, store, ref.lock_text)
        rnd = {"round": r, "starts": [round(x, 2) for x in starts], "rcs": [x.rc for x in results],
               "seconds": [round(x.seconds, 1) for x in results],
               "executed_by_count": dict(executed), "debris": h.debris(d)}
        if problems:
            rnd["problems"] = problems
            failures.append(rnd)
        else:
            shutil.rmtree(d, ignore_errors=True)
        details.append(rnd)
        print(f"round {r}: rc {rnd['rcs']}, {sum(executed.values())} executions for {len(ref.lock)} steps; "
              f"{problems if problems else 'OK'}")
    seconds = time.perf_counter() - t0
    figures.update(rounds=rounds, processes=N_PROCS, trials=rounds, failures=len(failures),
                   seconds=round(seconds, 1), store="one fresh store per round, shared by the 4",
                   rounds_detail=details)
    print(f"{rounds} rounds x {N_PROCS} processes, {len(failures)} failed, {seconds:.1f}s")
    assert not failures, "\n".join(f"round {x['round']}:\n  " + "\n  ".join(x["problems"]) for x in failures)
