"""A full disk: the store (or the export directory) on a tmpfs too small for the run.

Scenarios (tmpfs mounted with ``mount -t tmpfs -o size=...``; we run as root):
- store-30 / store-70: the store on a tmpfs of 30% / 70% of what the clean run's store
  needs (~12 MB), so a model write fails part-way (at a different step each);
- export: the pipeline directory (lock file, export) on a 512 kB tmpfs while the store
  is an intact copy of the reference (every step cached): the export (1.7 MB) fails.

For each: the run exits non-zero but not 3 (no internal error), prints no traceback, and
its error names the full directory, says the space ran out and gives sizes; nothing is
half-written (no staging directory, every action entry has its object and every object
re-hashes to its name, no partial export or export temp dir).  Then the tmpfs is remounted
bigger, the run resumes, and everything matches the reference.

Where mount is unavailable the same scenarios run through ``enospc_shim.py`` (Python-level
writes under the directory fail with ENOSPC past a byte budget), and "freeing space" is
running without the shim.
"""

from __future__ import annotations

import re
import shutil
import sys
import time
from pathlib import Path

import pytest

from . import harness as h

SHIM = Path(__file__).with_name("enospc_shim.py")


def _failure_problems(res, full_dir: Path) -> list[str]:
    problems = []
    if res.rc in (0, 3):
        problems.append(f"want a non-zero exit that is not 3 (internal error): {res.describe()}")
    if "Traceback" in res.err:
        problems.append(f"traceback on stderr: {res.describe()}")
    if str(full_dir) not in res.err:
        problems.append(f"the error does not name the full directory {full_dir}: {res.describe()}")
    if not re.search(r"space|full|ENOSPC", res.err, re.I):
        problems.append(f"the error does not say the disk is full: {res.describe()}")
    if not h.SIZE_RE.search(res.err):
        problems.append(f"the error gives no sizes: {res.describe()}")
    return problems


def _half_written(d: Path, store: Path) -> list[str]:
    problems = [f"after the failure: {p}" for p in h.store_problems(store)]
    target = d / h.OUTPUT_DIR
    if target.exists():
        problems += [f"after the failure: {p}" for p in h.export_problems(d, target_digest(target))]
    if target.parent.is_dir():
        extra = [p.name for p in target.parent.iterdir() if p.name != target.name]
        if extra:
            problems.append(f"after the failure: export debris {extra}")
    return problems


def target_digest(target: Path) -> str:
    try:
        return h.export_content_digest(target)
    except (OSError, ValueError, KeyError) as exc:
        return f"unreadable: {exc}"


@pytest.mark.chaos
def test_disk_full_is_a_clear_error_and_resumes(reference, figures, chaos_root):
    ref = reference
    use_tmpfs, why = h.tmpfs_works(chaos_root / "tmpfs-probe")
    figures["method"] = "tmpfs" if use_tmpfs else f"ENOSPC shim ({why})"
    print(f"disk full via {figures['method']}")
    need = ref.store_bytes
    scenarios = [("store-30", 0.30), ("store-70", 0.70), ("export", None)]
    details, failures = [], []
    t0 = time.perf_counter()
    for name, frac in scenarios:
        base = chaos_root / f"diskfull-{name}"
        if base.exists():
            shutil.rmtree(base)
        mnt = base / "mnt"
        size = int(need * frac) if frac else 512 * 1024
        mounted = False
        problems: list[str] = []
        rec = {"scenario": name, "limit_bytes": size}
        try:
            if use_tmpfs:
                h.mount_tmpfs(mnt, size)
                mounted = True
            else:
                mnt.mkdir(parents=True)
            if frac:  # the store on the small filesystem
                d = ref.fresh_dir(f"diskfull-{name}/pipe")
                store = mnt / "store"
            else:     # the pipeline dir (lock, export) on it; the store an intact copy
                d = mnt / "pipe"
                h.write_pipeline(d, ref.models)
                store = base / "store"
                shutil.copytree(ref.store, store)
            argv = ["run", h.PIPELINE_NAME, "--cache-dir", store]
            prefix = None if use_tmpfs else [sys.executable, str(SHIM), str(size), str(mnt), "--"]
            fail = h.wf_child(argv, cwd=d, prefix=prefix, timeout=600)
            rec.update(fail_rc=fail.rc, fail_seconds=round(fail.seconds, 1),
                       error=[line for line in fail.err.splitlines() if "error" in line.lower()][:3])
            problems += _failure_problems(fail, mnt)
            problems += _half_written(d, store)
            # free space, resume
            if use_tmpfs:
                h.remount_tmpfs(mnt, max(4 * need, 32 << 20))
            resume = h.wf_child(argv + ["--json"], cwd=d, timeout=600)
            rec.update(resume_rc=resume.rc, resume_seconds=round(resume.seconds, 1),
                       resume_executed=[n for n, (s, _, _) in resume.statuses().items() if s == "executed"])
            if resume.rc != 0:
                problems.append(f"resume after freeing space: {resume.describe()}")
            problems += h.check_all(d, store, ref.lock_text)
        finally:
            if mounted:
                h.umount(mnt)
        if problems:
            rec["problems"] = problems
            failures.append(rec)
        details.append(rec)
        print(f"{name}: limit {size} B -> rc {rec.get('fail_rc')}, resume rc {rec.get('resume_rc')}; "
              f"{problems if problems else 'OK'}")
    seconds = time.perf_counter() - t0
    figures.update(trials=len(scenarios), failures=len(failures), seconds=round(seconds, 1),
                   store_bytes_needed=need, scenarios=details)
    assert not failures, "\n".join(f"{x['scenario']} (limit {x['limit_bytes']} B):\n  " + "\n  ".join(x["problems"])
                                   for x in failures)
