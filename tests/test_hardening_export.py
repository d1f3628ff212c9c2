"""Trust I: exports never destroy what weightflow did not write, survive concurrent runs and a
full disk; a garbage lock file is an error, not an empty lock."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from conftest import write_pipeline

CFG = ("{model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, "
       "num_attention_heads: 2, vocab_size: 64}")
PIPE = f"""
weightflow: 1
steps:
  a: {{op: load, config: {CFG}}}
  b: {{op: load, config: {CFG}, init_seed: 1}}
"""
MARKER = "weightflow-export.json"



@pytest.fixture
def project(tmp_path, store_dir, cli):
    """A pipeline in tmp_path/proj whose two steps are already in the store."""
    proj = tmp_path / "proj"
    proj.mkdir()
    path = write_pipeline(proj, PIPE)
    rc, _, err = cli("run", path, "--cache-dir", store_dir, "-q")
    assert rc == 0, err
    return path


def tree(root: Path) -> dict:
    """Every file under root with its bytes (to prove nothing was touched)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def clean_error(rc, err):
    assert rc == 2, err
    assert "Traceback" not in err and "internal error" not in err, err


def digest_of(path: Path, step: str) -> str:
    return yaml.safe_load(path.with_suffix(".lock").read_text())["steps"][step]["digest"]


# -- 1. what an export may replace ------------------------------------------------------

def test_export_refuses_a_user_directory_even_with_force(project, store_dir, tmp_path, cli):
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "notes.txt").write_text("precious")
    (mine / "sub" / "data.bin").write_bytes(b"\x00\x01")
    before = tree(mine)
    for extra in ([], ["--force"]):
        rc, _, err = cli("export", project, "a", mine, "--cache-dir", store_dir, *extra)
        clean_error(rc, err)
        assert str(mine) in err and MARKER in err and "not empty" in err
        assert tree(mine) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "mine", "proj"]  # no temp dir left


def test_export_refuses_a_regular_file_even_with_force(project, store_dir, tmp_path, cli):
    target = tmp_path / "model"
    target.write_text("not a directory")
    for extra in ([], ["--force"]):
        rc, _, err = cli("export", project, "a", target, "--cache-dir", store_dir, *extra)
        clean_error(rc, err)
        assert str(target) in err and "file" in err
        assert target.read_text() == "not a directory"


def test_reexport_replaces_an_unchanged_export_but_not_a_modified_one(project, store_dir, tmp_path, cli):
    target = tmp_path / "exported"
    target.mkdir()  # an empty directory is fine
    rc, _, err = cli("export", project, "a", target, "--cache-dir", store_dir)
    assert rc == 0, err
    assert json.loads((target / MARKER).read_text())["digest"] == digest_of(project, "a")
    rc, _, err = cli("export", project, "b", target, "--cache-dir", store_dir)  # unchanged: replaced
    assert rc == 0, err
    assert json.loads((target / MARKER).read_text())["digest"] == digest_of(project, "b")
    # the user edits the export: added, changed and removed files
    (target / "notes.txt").write_text("mine")
    (target / "mydir").mkdir()
    with open(target / "config.json", "a") as fh:
        fh.write("\n")
    (target / "generation_config.json").unlink()
    before = tree(target)
    rc, _, err = cli("export", project, "a", target, "--cache-dir", store_dir)
    clean_error(rc, err)
    assert str(target) in err and "--force" in err
    for name in ("notes.txt", "mydir", "config.json", "generation_config.json"):
        assert name in err
    assert tree(target) == before and (target / "mydir").is_dir()
    rc, _, err = cli("export", project, "a", target, "--cache-dir", store_dir, "--force")
    assert rc == 0, err
    assert json.loads((target / MARKER).read_text())["digest"] == digest_of(project, "a")
    assert not (target / "notes.txt").exists() and not (target / "mydir").exists()
    assert (target / "generation_config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "exported", "proj"]


def _forbidden(kind: str, tmp_path: Path, store_dir: Path, project: Path) -> Path:
    return {
        "root": Path("/"),
        "home": tmp_path / "home",
        "pipeline dir": project.parent,
        "store root": store_dir,
        "inside the store": store_dir / "exports" / "x",
        "ancestor of the pipeline dir": tmp_path,
        "ancestor of the store": store_dir.parent,
    }[kind]


FORBIDDEN = ["root", "home", "pipeline dir", "store root", "inside the store",
             "ancestor of the pipeline dir", "ancestor of the store"]
REASON = {"root": "root", "home": "home", "pipeline dir": "pipeline", "store root": "store",
          "inside the store": "store", "ancestor of the pipeline dir": "contains",
          "ancestor of the store": "contains"}


@pytest.mark.parametrize("kind", FORBIDDEN)
def test_export_refuses_dangerous_targets(kind, tmp_path, monkeypatch, cli):
    home = tmp_path / "home"
    home.mkdir()  # empty: only the rule about the home directory stops it
    monkeypatch.setenv("HOME", str(home))
    store = tmp_path / "stores" / "cache"
    proj = tmp_path / "work" / "proj"
    proj.mkdir(parents=True)
    path = write_pipeline(proj, PIPE)
    assert cli("run", path, "--cache-dir", store, "-q")[0] == 0
    target = _forbidden(kind, tmp_path, store, path)
    if kind == "ancestor of the store":
        target = tmp_path / "stores"
    for extra in ([], ["--force"]):
        rc, _, err = cli("export", path, "a", target, "--cache-dir", store, *extra)
        clean_error(rc, err)
        assert str(target) in err and "refus" in err and REASON[kind] in err
    assert home.is_dir() and not any(home.iterdir())
    assert path.is_file() and (store / "objects").is_dir()
    assert not (store / "exports").exists()


@pytest.mark.parametrize("value,reason", [
    ("/", "root"),
    (".", "pipeline"),
    ("..", "contains"),
    ("{store}", "store"),
    ("{store}/out", "store"),
    ("mine", "not empty"),
    ("afile", "file"),
])
def test_bad_outputs_fail_before_any_step_runs(value, reason, tmp_path, store_dir, cli):
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "mine").mkdir()
    (proj / "mine" / "keep.txt").write_text("keep")
    (proj / "afile").write_text("keep")
    store_dir.mkdir()
    (store_dir / "keep.txt").write_text("keep")
    path = write_pipeline(proj, PIPE + f"outputs:\n  b: {value.format(store=store_dir)}\n")
    rc, _, err = cli("run", path, "--cache-dir", store_dir)
    clean_error(rc, err)
    assert f"{path}:6:" in err and "step 'b'" in err and reason in err, err
    assert not (store_dir / "objects").exists()  # no step ran
    assert not path.with_suffix(".lock").exists()
    assert (proj / "mine" / "keep.txt").read_text() == "keep" and (proj / "afile").read_text() == "keep"
    assert (store_dir / "keep.txt").read_text() == "keep"


def test_run_refuses_a_modified_output_unless_force_export(tmp_path, store_dir, cli):
    proj = tmp_path / "proj"
    proj.mkdir()
    path = write_pipeline(proj, PIPE + "outputs: {b: out/b}\n")
    rc, _, err = cli("run", path, "--cache-dir", store_dir, "-q")
    assert rc == 0, err
    out = proj / "out" / "b"
    assert json.loads((out / MARKER).read_text())["digest"] == digest_of(path, "b")
    assert cli("run", path, "--cache-dir", store_dir, "-q")[0] == 0  # unchanged: fine
    (out / "README.md").write_text("my notes")
    rc, _, err = cli("run", path, "--cache-dir", store_dir)
    clean_error(rc, err)
    assert f"{path}:" in err and str(out) in err and "README.md" in err and "--force-export" in err
    assert (out / "README.md").read_text() == "my notes"
    rc, _, err = cli("run", path, "--cache-dir", store_dir, "-q", "--force-export")
    assert rc == 0, err
    assert not (out / "README.md").exists() and (out / MARKER).is_file()


# -- 5. concurrent exports ------------------------------------------------------------------

WORKER = """
import os, sys, time
from weightflow.dsl.cli import main
pipe, store, target, go, steps = sys.argv[1:6]
while not os.path.exists(go):
    time.sleep(0.005)
for i in range(int(sys.argv[6])):
    step = steps.split(",")[i % len(steps.split(","))]
    rc = main(["export", pipe, step, target, "--cache-dir", store])
    if rc:
        sys.exit(rc)
"""


def test_concurrent_exports_to_one_target_all_succeed(project, store_dir, tmp_path):
    target = tmp_path / "shared" / "model"
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(project), str(store_dir), str(target),
                               str(go), "a,b" if i % 2 else "b,a", "6"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(6)]
    time.sleep(1.0)
    go.write_text("")
    results = [(p.wait(timeout=240), p.stdout.read(), p.stderr.read()) for p in procs]
    for rc, _, err in results:
        assert rc == 0, err
        assert "Traceback" not in err and "error" not in err, err
    marker = json.loads((target / MARKER).read_text())
    assert marker["digest"] in (digest_of(project, "a"), digest_of(project, "b"))
    assert sorted(p.name for p in target.parent.iterdir()) == ["model"]  # no temp dirs left
    # and the result is a complete, unmodified export: re-exporting the same step copies nothing
    step = "a" if marker["digest"] == digest_of(project, "a") else "b"
    res = subprocess.run([sys.executable, "-m", "weightflow", "export", str(project), step, str(target),
                          "--cache-dir", str(store_dir)], capture_output=True, text=True, check=False)
    assert res.returncode == 0 and "up to date" in res.stdout, res.stdout + res.stderr


def test_concurrent_runs_of_one_pipeline_all_succeed(tmp_path, store_dir):
    proj = tmp_path / "proj"
    proj.mkdir()
    seeded = PIPE.replace("init_seed: 1", "init_seed: '${vars.seed}'")
    path = write_pipeline(proj, "vars: {seed: 1}\n" + seeded + "outputs: {a: out/a, b: out/b}\n")
    go = tmp_path / "go"
    code = textwrap.dedent("""
        import os, sys, time
        from weightflow.dsl.cli import main
        while not os.path.exists(sys.argv[3]):
            time.sleep(0.005)
        for i in range(6):  # alternate b's seed: every run replaces out/b with another digest
            rc = main(["run", sys.argv[1], "--cache-dir", sys.argv[2], "-q", "--var", f"seed={i % 2}"])
            if rc:
                sys.exit(rc)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path), str(store_dir), str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    time.sleep(1.0)
    go.write_text("")
    for p in procs:
        rc = p.wait(timeout=300)
        err = p.stderr.read()
        assert rc == 0 and "Traceback" not in err, err
    assert json.loads((proj / "out" / "a" / MARKER).read_text())["digest"] == digest_of(path, "a")
    marker = json.loads((proj / "out" / "b" / MARKER).read_text())
    assert marker["manifest"]["step"] == "b" and marker["manifest"]["recipe"]["params"]["init_seed"] in (0, 1)
    assert sorted(p.name for p in (proj / "out").iterdir()) == ["a", "b"]  # no temp dirs left


# -- 11. the lock file ----------------------------------------------------------------------

GARBAGE = {
    "yaml": ("weightflow: 1\nsteps:\n  a: {op: load, key: [unclosed\n", ":4:1"),
    "scalar": ("just some text\n", "lock"),
    "list": ("- a\n- b\n", "lock"),
    "steps list": ("weightflow: 1\nsteps: [1, 2]\n", ":2"),
    "entry shape": ("weightflow: 1\nsteps:\n  a: {op: load}\n", ":3"),
}


@pytest.mark.parametrize("kind", list(GARBAGE))
def test_garbage_lock_file_is_an_error_and_is_not_overwritten(kind, tmp_path, store_dir, cli):
    path = write_pipeline(tmp_path, PIPE)
    text, where = GARBAGE[kind]
    lock = path.with_suffix(".lock")
    lock.write_text(text)
    for command in (["run"], ["plan"], ["status"], ["run", "--frozen"]):
        rc, _, err = cli(*command, path, "--cache-dir", store_dir)
        clean_error(rc, err)
        assert str(lock) in err and where in err and "--relock" in err, err
        assert lock.read_text() == text
    assert not (store_dir / "objects").exists()  # nothing ran


def test_relock_rewrites_a_garbage_lock_file(tmp_path, store_dir, cli):
    path = write_pipeline(tmp_path, PIPE)
    lock = path.with_suffix(".lock")
    lock.write_text("<<<<<<< HEAD\n")
    rc, _, err = cli("run", path, "--cache-dir", store_dir, "--relock", "-q")
    assert rc == 0, err
    assert set(yaml.safe_load(lock.read_text())["steps"]) == {"a", "b"}
    rc, _, err = cli("run", path, "--cache-dir", store_dir, "--relock", "--frozen")
    clean_error(rc, err)


def test_gc_with_a_garbage_lock_file_removes_nothing(project, store_dir, cli):
    lock = project.with_suffix(".lock")
    lock.write_text("steps: {a: [not, an, entry]}\n")
    objects = sorted((store_dir / "objects").rglob("*"))
    rc, _, err = cli("gc", lock, "--cache-dir", store_dir)
    clean_error(rc, err)
    assert str(lock) in err
    assert sorted((store_dir / "objects").rglob("*")) == objects


# -- 12. a full disk ------------------------------------------------------------------------

def _disk_full_after(n_ok: int):
    real = shutil.copyfile
    calls = []

    def copyfile(src, dst, *a, **k):
        calls.append(src)
        if len(calls) > n_ok:
            with open(dst, "wb") as fh:
                fh.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real(src, dst, *a, **k)
    return copyfile


def test_disk_full_during_export_leaves_no_temp_and_the_target_untouched(project, store_dir, tmp_path,
                                                                          cli, monkeypatch):
    target = tmp_path / "exported"
    assert cli("export", project, "a", target, "--cache-dir", store_dir)[0] == 0
    before = tree(target)
    monkeypatch.setattr(shutil, "copyfile", _disk_full_after(1))
    rc, _, err = cli("export", project, "b", target, "--cache-dir", store_dir)
    clean_error(rc, err)
    obj = store_dir / "objects" / digest_of(project, "b")[:2] / digest_of(project, "b")
    size = sum(f.stat().st_size for f in obj.rglob("*") if f.is_file())
    assert "no space left" in err.lower() and str(tmp_path) in err and "free" in err
    assert f"{size:,} bytes" in err, err
    assert tree(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "exported", "proj"]
    # a run's outputs too
    proj = project.parent
    out = proj / "out"
    project.write_text(PIPE + "outputs: {b: out/b}\n")
    rc, _, err = cli("run", project, "--cache-dir", store_dir)
    clean_error(rc, err)
    assert "no space left" in err.lower() and str(out) in err
    assert not out.exists() or not any(out.iterdir())


def test_disk_full_while_publishing_a_step_is_a_clear_error(tmp_path, store_dir, cli, monkeypatch):
    from weightflow.dsl.store.content import Store

    def publish(self, key, staged, digest, manifest):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.root / "objects" / digest[:2]))
    monkeypatch.setattr(Store, "publish", publish)
    path = write_pipeline(tmp_path, PIPE)
    rc, _, err = cli("run", path, "--cache-dir", store_dir)
    clean_error(rc, err)
    assert "no space left" in err.lower() and str(store_dir) in err and "free" in err
