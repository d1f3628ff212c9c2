"""Helpers of the chaos suite: the pipeline, running the CLI (in-process or as a child
process that can be SIGKILLed), checking a store from the outside, corrupting files and
mounting small tmpfs filesystems.

Everything a check needs is recomputed here with weightflow's own digest function
(``digest_directory``, in weightflow.dsl.format.checkpoint), never by asking the store.
"""

from __future__ import annotations

import contextlib
import faulthandler
import gc
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

SEED = int(os.environ.get("CHAOS_SEED", "20250611"))
INPROC_TIMEOUT_S = 300

# A Llama small enough to keep each step at milliseconds to a few seconds on 2 cores,
# big enough that a model artifact is ~1.7 MB (the store of one run is ~11 MB).
CHAOS_LLAMA = {
    "model_type": "llama", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
    "max_position_embeddings": 128,
}

PIPELINE_NAME = "pipeline.yaml"
LOCK_NAME = "pipeline.lock"
OUTPUT_STEP = "merged"
OUTPUT_DIR = "out/merged"

# Nine steps: three loads, two extract-deltas (dense deltas), two DARE prunes (sparse
# deltas), a TIES merge and an evaluate (a Report); the merge is exported.  (A
# prune-wanda step would add ~3 s of transformers model building to every run, which
# 60-odd runs on 2 shared cores cannot afford.)
PIPELINE = """\
weightflow: 1
seed: 7
steps:
  base: {{op: load, source: "{models}/base"}}
  ft_a: {{op: load, source: "{models}/ft_a"}}
  ft_b: {{op: load, source: "{models}/ft_b"}}
  delta_a: {{op: extract-delta, model: ft_a, base: base}}
  delta_b: {{op: extract-delta, model: ft_b, base: base}}
  dare_a: {{op: dare-prune, delta: delta_a, drop_rate: 0.9}}
  dare_b: {{op: dare-prune, delta: delta_b, drop_rate: 0.9, seed: 11}}
  merged: {{op: merge, method: ties, base: base, deltas: [dare_a, dare_b], density: 0.5}}
  scores:
    op: evaluate
    models: [ft_a, merged]
    metrics: [{{sparsity: {{}}}}, {{delta_norm: {{base: base}}}}]
outputs:
  {output}: {output_dir}
"""

VENV_BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]


def child_env() -> dict:
    env = dict(os.environ)
    for k in ("WEIGHTFLOW_CACHE", "WEIGHTFLOW_DEBUG"):
        env.pop(k, None)
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONDONTWRITEBYTECODE="1")
    return env


def write_pipeline(directory: Path, models: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / PIPELINE_NAME
    path.write_text(PIPELINE.format(models=models, output=OUTPUT_STEP, output_dir=OUTPUT_DIR))
    return path


# -- running the CLI ------------------------------------------------------------------

@dataclass
class Result:
    argv: list
    rc: int
    out: str
    err: str
    seconds: float
    lines: list = field(default_factory=list)  # (seconds since start, stderr line) for children

    def json(self):
        return json.loads(self.out)

    def statuses(self) -> dict:
        """{step: (status, key, digest)} from a `run --json` answer ({} if unparseable)."""
        try:
            doc = self.json()
        except ValueError:
            return {}
        return {s["name"]: (s["status"], s.get("key"), s.get("digest")) for s in doc.get("steps", [])}

    def describe(self) -> str:
        tail = "\n".join(self.err.strip().splitlines()[-15:])
        return f"`weightflow {' '.join(map(str, self.argv))}` -> rc {self.rc}\n    stderr tail:\n      " + \
            tail.replace("\n", "\n      ")


def wf(argv: list, cwd: Path | None = None) -> Result:
    """`weightflow ARGV` in this process (torch stays imported: ~10x cheaper than a child).

    argparse errors (an unknown command, say) come back as their exit status."""
    from weightflow.dsl.cli import main

    argv = [str(a) for a in argv]
    out, err = io.StringIO(), io.StringIO()
    old = os.getcwd()
    t0 = time.perf_counter()
    # a hung in-process command must not hang the suite: dump every thread and exit
    faulthandler.dump_traceback_later(INPROC_TIMEOUT_S, exit=True)
    try:
        if cwd:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(argv)
            except SystemExit as exc:
                rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
            except BaseException:  # noqa: BLE001 - main() must not raise; show what it did
                import traceback

                traceback.print_exc(file=err)
                rc = 99
    finally:
        faulthandler.cancel_dump_traceback_later()
        os.chdir(old)
        gc.collect()  # close the SQLite connections of the Store objects main() made
    return Result(argv, int(rc if rc is not None else 0), out.getvalue(), err.getvalue(),
                  time.perf_counter() - t0)


def cli_command(module: bool = False) -> list[str]:
    if module:
        return [sys.executable, "-m", "weightflow"]
    script = VENV_BIN / "weightflow"
    return [str(script)] if script.exists() else [sys.executable, "-m", "weightflow"]


def wf_child(argv: list, cwd: Path | None = None, timeout: float = 300, module: bool = False,
             prefix: list | None = None) -> Result:
    """`weightflow ARGV` as a child process."""
    argv = [str(a) for a in argv]
    cmd = (prefix or cli_command(module)) + argv
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=child_env(), capture_output=True, text=True, timeout=timeout)
    return Result(argv, proc.returncode, proc.stdout, proc.stderr, time.perf_counter() - t0)


class Child:
    """A `weightflow` child whose stderr lines are time-stamped as they arrive."""

    def __init__(self, argv: list, cwd: Path | None = None, module: bool = False, prefix=None):
        self.argv = [str(a) for a in argv]
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen((prefix or cli_command(module)) + self.argv, cwd=cwd,
                                     env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, start_new_session=True)
        self.lines: list[tuple[float, str]] = []
        self.first_line = threading.Event()
        self._out: list[str] = []
        self._threads = [threading.Thread(target=self._read_err, daemon=True),
                         threading.Thread(target=self._read_out, daemon=True)]
        for t in self._threads:
            t.start()

    def _read_err(self):
        for line in self.proc.stderr:
            self.lines.append((time.perf_counter() - self.t0, line.rstrip("\n")))
            self.first_line.set()
        self.first_line.set()

    def _read_out(self):
        self._out.append(self.proc.stdout.read())

    def wait_for(self, pattern: re.Pattern, timeout: float = 300) -> float | None:
        """Block until a stderr line matches (its time stamp) or the child exits (None)."""
        deadline = time.perf_counter() + timeout
        seen = 0
        while time.perf_counter() < deadline:
            n = len(self.lines)
            for t, line in self.lines[seen:n]:
                if pattern.search(line):
                    return t
            seen = n
            if self.proc.poll() is not None and not self._threads[0].is_alive():
                return None
            time.sleep(0.002)
        return None

    def kill(self) -> bool:
        """SIGKILL the child's process group (the child made it: start_new_session).
        False when it had already exited."""
        if self.proc.poll() is not None:
            return False
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            return False
        return True

    def wait(self, timeout: float = 300) -> Result:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            rc = self.proc.wait()
        for t in self._threads:
            t.join(timeout=10)
        seconds = time.perf_counter() - self.t0
        err = "\n".join(line for _, line in self.lines)
        return Result(self.argv, rc, "".join(self._out), err, seconds, list(self.lines))


# -- checking a store from the outside ---------------------------------------------------

def checkpoint_module():
    """The module with weightflow's digest_directory (weightflow.dsl.format.checkpoint;
    weightflow.dsl.checkpoint before the package was split into rooms)."""
    import importlib

    for name in ("weightflow.dsl.format.checkpoint", "weightflow.dsl.checkpoint"):
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError:
            continue
    raise ModuleNotFoundError("no weightflow module with digest_directory")


def digest_of(directory: Path) -> str | None:
    digest_directory = checkpoint_module().digest_directory
    try:
        return digest_directory(directory)
    except (OSError, ValueError, KeyError) as exc:
        return f"unreadable: {exc}"


def export_marker_name() -> str:
    import importlib

    for name in ("weightflow.dsl.store.export", "weightflow.dsl.executor"):
        try:
            return importlib.import_module(name).EXPORT_MARKER
        except (ImportError, AttributeError):
            continue
    return "weightflow-export.json"


def export_content_digest(directory: Path) -> str:
    """digest_directory of an export, its marker file left out (the marker is not content)."""
    ck = checkpoint_module()
    INDEX_SUFFIX, NON_CONTENT = ck.INDEX_SUFFIX, ck.NON_CONTENT
    artifact_digest, digest_safetensors, hash_file = ck.artifact_digest, ck.digest_safetensors, ck.hash_file

    marker = export_marker_name()
    tensors, files = [], {}
    for f in sorted(directory.rglob("*")):
        if not f.is_file():
            continue
        rel = f.relative_to(directory).as_posix()
        if rel == marker:
            continue
        if rel.endswith(".safetensors"):
            tensors.extend(digest_safetensors(f))
        elif rel not in NON_CONTENT and not rel.endswith(INDEX_SUFFIX):
            files[rel] = hash_file(f)
    return artifact_digest(tensors, files)


def store_problems(store: Path) -> list[str]:
    """Everything wrong with a store at rest: objects that do not re-hash to their name,
    action entries that are unreadable, name another key or point at no object, and
    staging directories left in tmp/."""
    problems = []
    objects = store / "objects"
    for d in sorted(objects.glob("*/*")) if objects.is_dir() else []:
        if not d.is_dir():
            continue
        got = digest_of(d)
        if got != d.name:
            problems.append(f"object {d.name[:12]} re-hashes to {str(got)[:40]}")
    actions = store / "actions"
    for a in sorted(actions.glob("*/*.json")) if actions.is_dir() else []:
        try:
            doc = json.loads(a.read_text())
        except (OSError, ValueError) as exc:
            problems.append(f"action {a.name} unreadable: {exc}")
            continue
        if doc.get("key") != a.stem:
            problems.append(f"action {a.stem[:12]} names key {str(doc.get('key'))[:12]}")
        digest = doc.get("digest")
        if not isinstance(digest, str) or not (objects / digest[:2] / digest).is_dir():
            problems.append(f"action {a.stem[:12]} points at missing object {str(digest)[:12]}")
    problems += [f"staging dir left in tmp/: {p.name}" for p in staging_dirs(store)]
    return problems


def missing_entries(store: Path, ref_lock: str) -> list[str]:
    """Reference lock entries whose action or object is not in the store."""
    problems = []
    for name, (key, digest) in lock_digests(ref_lock).items():
        a = store / "actions" / key[:2] / f"{key}.json"
        try:
            got = json.loads(a.read_text()).get("digest")
        except (OSError, ValueError):
            problems.append(f"step {name}: no readable action entry for key {key[:12]}")
            continue
        if got != digest:
            problems.append(f"step {name}: action says digest {str(got)[:12]}, reference {digest[:12]}")
        if not (store / "objects" / digest[:2] / digest).is_dir():
            problems.append(f"step {name}: object {digest[:12]} missing")
    return problems


def staging_dirs(store: Path) -> list[Path]:
    tmp = store / "tmp"
    return sorted(p for p in tmp.iterdir() if p.is_dir()) if tmp.is_dir() else []


def debris(directory: Path) -> list[str]:
    """Temp files of interrupted atomic writes (``.NAME.*.tmp``) anywhere below ``directory``."""
    if not directory.is_dir():
        return []
    return sorted(str(p.relative_to(directory)) for p in directory.rglob(".*")
                  if p.name.endswith(".tmp") or ".tmp-" in p.name or ".old-" in p.name)


def export_problems(pipeline_dir: Path, lock_digest: str) -> list[str]:
    target = pipeline_dir / OUTPUT_DIR
    problems = []
    marker = target / export_marker_name()
    try:
        doc = json.loads(marker.read_text())
    except (OSError, ValueError) as exc:
        return [f"export {OUTPUT_DIR}: no readable marker ({type(exc).__name__}: {exc})"]
    if doc.get("digest") != lock_digest:
        problems.append(f"export marker digest {str(doc.get('digest'))[:12]} != lock {lock_digest[:12]}")
    try:
        content = export_content_digest(target)
    except (OSError, ValueError, KeyError) as exc:
        content = f"unreadable: {exc}"
    if content != lock_digest:
        problems.append(f"export content re-hashes to {content[:12]}, lock says {lock_digest[:12]}")
    siblings = [p.name for p in target.parent.iterdir() if p.name != target.name]
    if siblings:
        problems.append(f"export debris beside {OUTPUT_DIR}: {siblings}")
    return problems


def lock_digests(lock_text: str) -> dict[str, tuple[str, str]]:
    import yaml

    return {n: (e["key"], e["digest"]) for n, e in yaml.safe_load(lock_text)["steps"].items()}


def check_all(pipeline_dir: Path, store: Path, ref_lock: str) -> list[str]:
    """The invariants every chaos test ends with: lock == reference, store at rest is
    sound, the export is complete."""
    problems = []
    lock = pipeline_dir / LOCK_NAME
    text = lock.read_bytes().decode("utf-8", "replace") if lock.exists() else None
    if text != ref_lock:
        problems.append("lock file differs from the clean reference" if text else "no lock file")
    problems += store_problems(store)
    problems += missing_entries(store, ref_lock)
    problems += export_problems(pipeline_dir, lock_digests(ref_lock)[OUTPUT_STEP][1])
    return problems


# -- corrupting files ---------------------------------------------------------------------

def flip_byte(path: Path, offset: int, mask: int = 0xFF, keep_mtime: bool = False) -> dict:
    """XOR one byte of ``path`` in place (same inode, same size).  ``keep_mtime`` puts the
    original atime/mtime back (os.utime), as a bit flip on disk or a careless tool would."""
    st = path.stat()
    with open(path, "r+b") as fh:
        fh.seek(offset)
        old = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([old[0] ^ mask]))
        fh.flush()
        os.fsync(fh.fileno())
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    elif path.stat().st_mtime_ns == st.st_mtime_ns:  # a coarse clock: make the write visible
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    after = path.stat()
    return {"file": str(path), "offset": offset, "old": old[0], "new": old[0] ^ mask,
            "mtime_restored": after.st_mtime_ns == st.st_mtime_ns, "inode_same": after.st_ino == st.st_ino}


def replace_byte(path: Path, offset: int, new: int, keep_mtime: bool = False) -> dict:
    data = path.read_bytes()
    return flip_byte(path, offset, data[offset] ^ new, keep_mtime)


# -- tmpfs ------------------------------------------------------------------------------------

def tmpfs_works(probe_dir: Path) -> tuple[bool, str]:
    if os.environ.get("CHAOS_NO_TMPFS"):
        return False, "CHAOS_NO_TMPFS is set"
    probe_dir.mkdir(parents=True, exist_ok=True)
    try:
        mount_tmpfs(probe_dir, 1 << 20)
    except (OSError, subprocess.CalledProcessError) as exc:
        return False, f"mount -t tmpfs failed: {exc}"
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        umount(probe_dir)
    return True, "mount -t tmpfs works"


def mount_tmpfs(directory: Path, size_bytes: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes // 1024}k", "tmpfs", str(directory)],
                   check=True, capture_output=True, timeout=30)


def remount_tmpfs(directory: Path, size_bytes: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size_bytes // 1024}k", str(directory)],
                   check=True, capture_output=True, timeout=30)


def umount(directory: Path) -> None:
    r = subprocess.run(["umount", str(directory)], capture_output=True, timeout=30)
    if r.returncode != 0:
        subprocess.run(["umount", "-l", str(directory)], capture_output=True, timeout=30)


def tree_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


SIZE_RE = re.compile(r"\d+(\.\d+)?\s*(bytes|[kKMGT]i?B|B)\b")
