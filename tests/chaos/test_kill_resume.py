"""SIGKILL a `weightflow run` at seeded random moments, then resume it.

Each trial has its own pipeline directory and a fresh store (so a kill can land in any
step, the export or the lock write; a shared store would make every later trial a cache
hit).  Odd trials start with a stale weightflow export (of another step) in the output
directory, so the export replaces an existing directory.  About a quarter of the trials
kill the first resume as well.

The kill moment: a seeded random phase -- one of the nine steps, or "the export" -- and a
seeded uniform delay within it.  The child's progress line that opens the phase ("[k/9]
STEP (op): running", or the last step's "done" line for the export) is waited for, then
the delay, drawn from [0, 1.2 x the phase's length in the clean reference run], is slept
and the child's process group gets SIGKILL.  (Counting from process start instead puts
most kills inside the first step, which imports torch.)  The phase the kill actually
landed in is read back from the child's progress lines and tallied.

After the final resume (in-process, exit 0 required): the lock file equals the clean
reference byte for byte, every object re-hashes (digest_directory) to its name, every
action entry names its own key and an existing object, every reference entry is in the
store, tmp/ holds no staging directory, and the export's marker and content digest equal
the lock's digest with no debris beside it; and `weightflow verify --deep` agrees (exit 0).
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

STEP_LINE = re.compile(r"\[(\d+)/(\d+)\] (\S+) \((\S+)\): (running|done|cached)")


def phases_of(lines) -> list[tuple[str, re.Pattern, float]]:
    """(phase, the line that opens it, its length in seconds) from the clean run's lines."""
    marks = []
    for t, line in lines:
        m = STEP_LINE.search(line)
        if m and m.group(5) == "running":
            marks.append((f"step {m.group(3)}", re.compile(re.escape(m.group(0))), t))
        elif m and m.group(5) == "done" and m.group(1) == m.group(2):
            marks.append(("export", re.compile(re.escape(m.group(0).rsplit(":", 1)[0]) + r": done"), t))
    end = max(t for t, _ in lines) + 0.3  # the exit after the last line (lock write, teardown)
    return [(name, pat, (marks[i + 1][2] if i + 1 < len(marks) else end) - t)
            for i, (name, pat, t) in enumerate(marks)]


def landed_in(lines, t_kill: float | None, exited: bool) -> str:
    if exited:
        return "completed before the kill"
    last = None
    for t, line in lines:
        if t > t_kill:
            break
        if line.startswith("exported "):
            return "after the export (exit)"
        m = STEP_LINE.search(line)
        if m:
            last = m
    if last is None:
        return "before the first step"
    index, total, name, _, what = last.groups()
    if what == "running":
        return f"during {name}"
    if index == total:
        return "export (after the last step)"
    return f"between steps (after {name})"


@pytest.mark.chaos
def test_sigkill_at_random_moments_then_resume(reference, figures, chaos_root):
    ref = reference
    rng = random.Random(h.SEED)
    n = int(os.environ.get("CHAOS_KILL_TRIALS", "20"))
    phases = phases_of(ref.lines)
    assert len(phases) == len(ref.lock) + 1, phases
    stale = chaos_root / "stale-export"
    if not stale.exists():  # an earlier weightflow export of another step (ft_a)
        r = h.wf(["export", ref.dir / h.PIPELINE_NAME, "ft_a", stale, "--cache-dir", ref.store])
        assert r.rc == 0, r.describe()
    landed = collections.Counter()
    details, failures = [], []
    t0 = time.perf_counter()
    for i in range(n):
        d = ref.fresh_dir(f"kill-{i:02d}")
        store = d / "store"
        if i % 2:
            (d / h.OUTPUT_DIR).parent.mkdir(parents=True)
            shutil.copytree(stale, d / h.OUTPUT_DIR)
        kills = []
        for k in range(2 if rng.random() < 0.25 else 1):
            phase, opens, length = rng.choice(phases)
            delay = rng.uniform(0, 1.2 * length)
            child = h.Child(["run", h.PIPELINE_NAME, "--cache-dir", store], cwd=d, module=bool(i % 3 == 0))
            # the second kill hits the first resume, whose finished steps are cached: count
            # from its first line instead
            child.wait_for(opens if k == 0 else re.compile("."), timeout=300)
            time.sleep(delay)
            t_kill = time.perf_counter() - child.t0
            killed = child.kill()
            res = child.wait()
            where = landed_in(res.lines, t_kill, not killed)
            landed[where] += 1
            kills.append({"aimed_at": phase if k == 0 else "resume", "delay": round(delay, 3),
                          "landed": where, "rc": res.rc, "staging_dirs_left": len(h.staging_dirs(store))})
            if not killed and res.rc != 0:
                kills[-1]["error"] = res.describe()
        resume = h.wf(["run", h.PIPELINE_NAME, "--cache-dir", store, "--json"], cwd=d)
        problems = [] if resume.rc == 0 else [f"resume failed: {resume.describe()}"]
        problems += h.check_all(d, store, ref.lock_text)
        deep = h.wf(["verify", "--deep", "--cache-dir", store, d / h.PIPELINE_NAME])
        if deep.rc != 0:  # the product's own check agrees: no false alarm after a crash
            problems.append(f"verify --deep after the resume: {deep.describe()}")
        problems += [f"kill run failed on its own: {x['error']}" for x in kills if "error" in x]
        executed = [s for s, (st, _, _) in resume.statuses().items() if st == "executed"]
        trial = {"trial": i, "stale_export": bool(i % 2), "kills": kills, "resume_rc": resume.rc,
                 "resume_seconds": round(resume.seconds, 2), "resume_executed": executed,
                 "debris": h.debris(d)}
        if problems:
            trial["problems"] = problems
            failures.append(trial)
        else:
            shutil.rmtree(d, ignore_errors=True)
        details.append(trial)
        print(f"trial {i:2d}: {[(x['aimed_at'], x['landed']) for x in kills]} -> resume rc {resume.rc}, "
              f"re-executed {len(executed)}; {problems if problems else 'OK'}")
    seconds = time.perf_counter() - t0
    n_debris = sum(bool(t["debris"]) for t in details)
    figures.update(trials=n, kills=sum(len(t["kills"]) for t in details), failures=len(failures),
                   seconds=round(seconds, 1), store="fresh store per trial",
                   landed=dict(sorted(landed.items())), trials_with_tmp_debris=n_debris,
                   trials_detail=details)
    if n_debris:
        figures.setdefault("notes", []).append(
            f"NOTE: {n_debris} trial(s) left temp files of interrupted atomic writes (.NAME.*.tmp) in the "
            "store or beside the pipeline: harmless to the results, but never cleaned up")
    print(f"{n} trials, {figures['kills']} kills, {len(failures)} failed, {seconds:.1f}s; landed {dict(landed)}")
    assert not failures, "\n".join(
        f"trial {t['trial']} (kills {[(k['aimed_at'], k['landed']) for k in t['kills']]}, "
        f"stale export {t['stale_export']}):\n  " + "\n  ".join(t["problems"]) for t in failures)


@pytest.mark.chaos
def test_sigkill_in_the_middle_of_the_export_copy(reference, figures, chaos_root):
    """Event-triggered kills: the output directory is polled (every 0.5 ms) while the run
    goes, and the child is SIGKILLed the moment the export's temp copy appears beside the
    target -- once onto a fresh target, once replacing a stale export.  The resume must
    leave a complete export and nothing else in out/ (same checks as above)."""
    ref = reference
    stale = chaos_root / "stale-export"
    if not stale.exists():
        r = h.wf(["export", ref.dir / h.PIPELINE_NAME, "ft_a", stale, "--cache-dir", ref.store])
        assert r.rc == 0, r.describe()
    details, failures = [], []
    t0 = time.perf_counter()
    for i, with_stale in enumerate([False, True]):
        d = ref.fresh_dir(f"kill-export-{i}")
        store = d / "store"
        out = (d / h.OUTPUT_DIR).parent
        out.mkdir(parents=True)
        if with_stale:
            shutil.copytree(stale, d / h.OUTPUT_DIR)
        child = h.Child(["run", h.PIPELINE_NAME, "--cache-dir", store], cwd=d)
        seen = None
        while child.proc.poll() is None:
            dot = [p.name for p in out.iterdir() if p.name.startswith(".")]
            if dot:
                seen = dot
                break
            time.sleep(0.0005)
        killed = child.kill()
        res = child.wait()
        caught = bool(seen) and killed
        left = sorted(p.name for p in out.iterdir() if p.name != d.joinpath(h.OUTPUT_DIR).name)
        resume = h.wf(["run", h.PIPELINE_NAME, "--cache-dir", store, "--json"], cwd=d)
        problems = [] if resume.rc == 0 else [f"resume failed: {resume.describe()}"]
        problems += h.check_all(d, store, ref.lock_text)
        rec = {"trial": i, "stale_export": with_stale, "killed_mid_copy": caught, "saw": seen,
               "left_by_the_kill": left, "kill_rc": res.rc, "resume_rc": resume.rc}
        if not caught:
            rec["note"] = "the export finished before its temp copy was seen; nothing to check"
        if problems:
            rec["problems"] = problems
            failures.append(rec)
        else:
            shutil.rmtree(d, ignore_errors=True)
        details.append(rec)
        print(f"export kill {i} (stale export {with_stale}): caught mid-copy {caught}, left {left}; "
              f"{problems if problems else 'OK'}")
    figures.update(trials=len(details), failures=len(failures), seconds=round(time.perf_counter() - t0, 1),
                   caught_mid_copy=sum(x["killed_mid_copy"] for x in details), trials_detail=details)
    assert not failures, "\n".join(f"export kill {x['trial']} (stale export {x['stale_export']}, left "
                                   f"{x['left_by_the_kill']}):\n  " + "\n  ".join(x["problems"]) for x in failures)
