"""Trust in the store (issue 10, items 6-10): staging owned by live processes, a gc
that is safe on a shared store, a self-healing memo, provenance records that tie an
action to its object, and ``weightflow verify``.

Most tests use a tiny torch-free op (``note``) registered for the test, so the store
logic is exercised in milliseconds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Annotated

import pytest
from conftest import lock_of, run, write_pipeline

DAY = 86400.0


# -- a torch-free op ---------------------------------------------------------------

def _note_op():
    from weightflow.dsl.lang.spec import Kind, OpParams, OpSpec, StepRef

    class NoteParams(OpParams):
        text: str
        salt: int = 0  # enters the key, not the content: two keys, one object
        src: Annotated[str | None, StepRef((Kind.REPORT,))] = None
        spoil: Annotated[str | None, StepRef((Kind.REPORT,))] = None

    def run_note(inputs, params, ctx):
        body = params.text
        if "src" in inputs:
            body += "+" + (inputs["src"].path / "note.txt").read_text()
        if "spoil" in inputs:  # corrupt an input in place, keeping size, mtime and inode
            _flip_keep_stat(inputs["spoil"].path / "note.txt", 0)
        (ctx.out / "note.txt").write_text(body)
        return {}

    return OpSpec(name="note", version=1, output=Kind.REPORT, params=NoteParams, run=run_note,
                  doc="write a note (tests)")


@pytest.fixture(autouse=True)
def note_op():
    from weightflow.dsl.lang import registry

    registry.register(_note_op())
    yield
    registry.unregister("note")


NOTES = """
weightflow: 1
steps:
  a: {op: note, text: alpha}
  b: {op: note, text: beta}
  c: {op: note, text: gamma, src: a}
"""


def _flip_keep_stat(path: Path, offset: int) -> None:
    """Flip one byte in place; restore the mtime so only a re-hash can notice."""
    st = path.stat()
    with open(path, "r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([b[0] ^ 0x01]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_mtime_ns == st.st_mtime_ns and path.stat().st_ino == st.st_ino


def _obj(store_dir: Path, digest: str) -> Path:
    return store_dir / "objects" / digest[:2] / digest


def _action(store_dir: Path, key: str) -> Path:
    return store_dir / "actions" / key[:2] / f"{key}.json"


def _age(path: Path, days: float) -> None:
    t = time.time() - days * DAY
    os.utime(path, (t, t))


def _cli(*args) -> int:
    from weightflow.dsl.cli import main

    return main([str(a) for a in args])


def _python(code: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).parent)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE,
                            stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **kw)


# -- 6: staging directories are owned by live processes ----------------------------

HOLD = """
    import os, signal, sys
    from weightflow.dsl.store.content import Store
    with Store(sys.argv[1] if len(sys.argv) > 1 else {root!r}).staging() as tmp:
        (tmp / "model.safetensors").write_bytes(b"half" * 1000)
        print(tmp, flush=True)
        if {kill!r}:
            os.kill(os.getpid(), signal.SIGKILL)
        sys.stdin.readline()  # hold the staging dir until the test says so
        print("still there" if (tmp / "model.safetensors").exists() else "GONE", flush=True)
"""


def _staging_of_killed_process(store_dir: Path) -> Path:
    proc = _python(HOLD.format(root=str(store_dir), kill=True))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err
    tmp = Path(out.strip())
    assert tmp.is_dir() and tmp.parent.parent == store_dir / "tmp"
    return tmp


def test_staging_left_by_a_sigkilled_run_is_removed_by_the_next_run(tmp_path, store_dir):
    dead = _staging_of_killed_process(store_dir)
    path = write_pipeline(tmp_path, NOTES)
    _, status = run(path, store_dir)
    assert set(status.values()) == {"executed"}
    assert not dead.exists() and not dead.parent.exists()
    assert list((store_dir / "tmp").iterdir()) == []  # its .lock file went too


def test_gc_and_run_keep_a_live_runs_staging_but_remove_a_dead_ones(tmp_path, store_dir):
    path = write_pipeline(tmp_path, NOTES)
    run(path, store_dir)
    dead = _staging_of_killed_process(store_dir)
    holder = _python(HOLD.format(root=str(store_dir), kill=False))
    try:
        live = Path(holder.stdout.readline().strip())
        assert live.is_dir()
        assert _cli("gc", path, "--older-than", "0", "--cache-dir", store_dir) == 0
        assert live.is_dir() and (live / "model.safetensors").is_file()
        assert not dead.exists() and not dead.parent.exists()
        run(path, store_dir)
        assert live.is_dir()
        out, _ = holder.communicate("go\n", timeout=60)
        assert holder.returncode == 0 and "still there" in out
    finally:
        if holder.poll() is None:
            holder.kill()
    assert not live.parent.exists()  # the owner removed its own staging on the way out
    assert list((store_dir / "tmp").iterdir()) == []


# -- 7: gc on a shared store -------------------------------------------------------

def _gc_json(store_dir, *args, capsys) -> dict:
    capsys.readouterr()
    assert _cli("gc", "--cache-dir", store_dir, "--json", *args) == 0
    return json.loads(capsys.readouterr().out)


def test_gc_without_lock_files_removes_only_entries_unused_for_older_than(tmp_path, store_dir, capsys):
    path = write_pipeline(tmp_path, NOTES)
    run(path, store_dir)
    lock = lock_of(path)
    _age(_action(store_dir, lock["b"]["key"]), 30)
    dry = _gc_json(store_dir, "--dry-run", capsys=capsys)
    assert [(r["step"], r["pipeline"], r["key"]) for r in dry["removed"]] == \
        [("b", str(path.resolve()), lock["b"]["key"])]
    row = dry["removed"][0]
    assert row["bytes"] > 0 and row["digest"] == lock["b"]["digest"]
    assert row["last_used"] < time.strftime("%Y-%m-%d", time.gmtime(time.time() - 29 * DAY))
    assert dry["actions"] == 1 and dry["objects"] == 1 and dry["kept_actions"] == 2
    assert _action(store_dir, lock["b"]["key"]).exists()  # dry run: nothing removed
    # the default keeps 14 days; a 60-day threshold keeps the 30-day-old entry too
    assert _gc_json(store_dir, "--dry-run", "--older-than", "60", capsys=capsys)["removed"] == []
    done = _gc_json(store_dir, capsys=capsys)
    assert [r["step"] for r in done["removed"]] == ["b"] and not done["dry_run"]
    assert not _action(store_dir, lock["b"]["key"]).exists()
    assert not _obj(store_dir, lock["b"]["digest"]).exists()
    assert _obj(store_dir, lock["a"]["digest"]).is_dir()
    _, status = run(path, store_dir)
    assert status == {"a": "cached", "b": "executed", "c": "cached"}


def test_gc_text_lists_step_pipeline_size_and_last_use(tmp_path, store_dir, capsys):
    path = write_pipeline(tmp_path, NOTES)
    run(path, store_dir)
    _age(_action(store_dir, lock_of(path)["c"]["key"]), 20)
    capsys.readouterr()
    assert _cli("gc", "--cache-dir", store_dir, "--dry-run") == 0
    out = capsys.readouterr().out
    assert "STEP" in out and "LAST USE" in out
    line = next(x for x in out.splitlines() if x.startswith("c "))
    assert str(path.resolve()) in line and " B" in line
    assert "would remove 1 entry and 1 object (" in out


def test_gc_lock_files_protect_their_entries_however_old(tmp_path, store_dir, capsys):
    one = write_pipeline(tmp_path, NOTES, "one.yaml")
    two = write_pipeline(tmp_path, "weightflow: 1\nsteps:\n  z: {op: note, text: zeta}\n", "two.yaml")
    run(one, store_dir)
    run(two, store_dir)
    from weightflow.dsl.store.content import Store

    for _, p in Store(store_dir).actions():
        _age(p, 100)
    doc = _gc_json(store_dir, one, capsys=capsys)
    assert [r["step"] for r in doc["removed"]] == ["z"] and doc["kept_by_lock"] == 3
    _, status = run(one, store_dir)
    assert set(status.values()) == {"cached"}


def test_a_lookup_hit_records_last_use(tmp_path, store_dir, capsys):
    from weightflow.dsl.engine.planner import plan
    from weightflow.dsl.lang.pipeline import load_pipeline
    from weightflow.dsl.store.content import Store

    path = write_pipeline(tmp_path, NOTES)
    run(path, store_dir)
    actions = [p for _, p in Store(store_dir).actions()]
    for p in actions:
        _age(p, 30)
    plan(load_pipeline(path), Store(store_dir))  # plan looks every entry up
    assert all(time.time() - p.stat().st_mtime < 3600 for p in actions)
    assert _gc_json(store_dir, capsys=capsys)["removed"] == []


def test_gc_keeps_an_object_that_a_kept_entry_shares(tmp_path, store_dir, capsys):
    path = write_pipeline(tmp_path, "weightflow: 1\nsteps:\n  x1: {op: note, text: same, salt: 1}\n"
                          "  x2: {op: note, text: same, salt: 2}\n")
    run(path, store_dir)
    lock = lock_of(path)
    assert lock["x1"]["digest"] == lock["x2"]["digest"] and lock["x1"]["key"] != lock["x2"]["key"]
    _age(_action(store_dir, lock["x1"]["key"]), 30)
    doc = _gc_json(store_dir, capsys=capsys)
    assert [(r["step"], r["bytes"]) for r in doc["removed"]] == [("x1", 0)] and doc["objects"] == 0
    assert _obj(store_dir, lock["x2"]["digest"]).is_dir()
    _, status = run(path, store_dir)
    assert status == {"x1": "executed", "x2": "cached"}


def test_gc_rejects_bad_arguments_without_a_traceback(tmp_path, store_dir, capsys):
    assert _cli("gc", "--cache-dir", store_dir, "--older-than", "-1") == 2
    assert "--older-than" in capsys.readouterr().err
    assert _cli("gc", tmp_path / "nope.lock", "--cache-dir", store_dir) == 2
    assert "lock file not found" in capsys.readouterr().err


# -- 8: a corrupt memo is a cache miss, not a dead store ----------------------------

def _populated_store(tmp_path, store_dir) -> tuple[Path, list[Path]]:
    from weightflow.dsl.store.content import Store

    path = write_pipeline(tmp_path, NOTES)
    run(path, store_dir)
    files = []
    (tmp_path / "files").mkdir()
    s = Store(store_dir)
    s.memo.db.execute("BEGIN")  # one transaction: one fsync, not 300
    for i in range(120):
        f = tmp_path / "files" / f"f{i}.txt"
        f.write_text(str(i) * 10)
        s.file_digest(f)
        files.append(f)
    s.memo.db.execute("COMMIT")
    import gc
    import sqlite3

    del s
    gc.collect()  # close every connection of the stores above
    conn = sqlite3.connect(store_dir / "memo.sqlite")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # everything into memo.sqlite itself
    conn.close()
    wal = store_dir / "memo.sqlite-wal"
    assert not wal.exists() or wal.stat().st_size == 0
    return path, files


# offsets that sqlite always notices: the magic string, the page size, the write
# version (reads work, writes say "readonly"), the page count, page 1's b-tree
# header, page 2 (the first table's root)
SURE = [0, 16, 18, 28, 100, 4096]


@pytest.mark.parametrize("where", SURE + ["end"])
def test_byte_flips_in_the_memo_never_brick_a_command(tmp_path, store_dir, capfd, where):
    from weightflow.dsl.format.checkpoint import hash_file
    from weightflow.dsl.store.content import Store

    path, files = _populated_store(tmp_path, store_dir)
    memo = store_dir / "memo.sqlite"
    data = bytearray(memo.read_bytes())
    offset = len(data) - 1 if where == "end" else where
    data[offset] ^= 0xFF
    memo.write_bytes(bytes(data))
    capfd.readouterr()
    for command in (["status", path], ["plan", path], ["run", path, "-q"]):
        assert _cli(*command, "--cache-dir", store_dir) == 0, command
    s = Store(store_dir)
    assert all(s.file_digest(f) == hash_file(f) for f in files)  # every row read back or rebuilt
    new = tmp_path / "new.txt"
    new.write_text("new")
    assert s.file_digest(new) == hash_file(new)  # a write (a flipped write version shows only here)
    err = capfd.readouterr().err
    assert "internal error" not in err and "Traceback" not in err
    aside = sorted(store_dir.glob("memo.sqlite.corrupt-*"))
    if where in SURE:
        assert aside and err.count("moved it aside") == 1  # one warning, then a fresh memo
    if aside:
        assert memo.exists()  # a fresh memo replaced it
    # the next command is quiet: the memo was rebuilt
    assert _cli("status", path, "--cache-dir", store_dir) == 0
    assert "memo" not in capfd.readouterr().err


def test_a_memo_that_is_not_a_database_at_all(tmp_path, store_dir, capfd):
    path = write_pipeline(tmp_path, NOTES)
    store_dir.mkdir()
    (store_dir / "memo.sqlite").write_bytes(b"garbage" * 1000)
    Path(f"{store_dir / 'memo.sqlite'}-wal").write_bytes(b"junk")
    assert _cli("run", path, "-q", "--cache-dir", store_dir) == 0
    err = capfd.readouterr().err
    assert err.count("moved it aside") == 1
    assert len(list(store_dir.glob("memo.sqlite.corrupt-*"))) >= 1
    wal = Path(f"{store_dir / 'memo.sqlite'}-wal")
    assert not wal.exists() or wal.read_bytes() != b"junk"  # sqlite dropped it, or it was moved aside


# -- 9: an action must point at an object its key published --------------------------

def test_an_action_pointing_at_another_valid_object_is_discarded(tmp_path, store_dir):
    path = write_pipeline(tmp_path, NOTES)
    run(path, store_dir)
    lock_text = path.with_suffix(".lock").read_text()
    lock = lock_of(path)
    apath = _action(store_dir, lock["a"]["key"])
    doc = json.loads(apath.read_text())
    doc["digest"] = lock["b"]["digest"]  # a valid object, just not a's output
    apath.write_text(json.dumps(doc))
    outcome, status = run(path, store_dir)
    assert status == {"a": "executed", "b": "cached", "c": "cached"}
    assert any("corrupted" in m and "never published for this key" in m for m in outcome.logs)
    assert path.with_suffix(".lock").read_text() == lock_text
    assert _obj(store_dir, lock["b"]["digest"]).is_dir()  # b's object is fine and stays


def test_an_action_copied_from_another_key_is_discarded(tmp_path, store_dir):
    path = write_pipeline(tmp_path, NOTES)
    run(path, store_dir)
    lock = lock_of(path)
    _action(store_dir, lock["a"]["key"]).write_bytes(_action(store_dir, lock["b"]["key"]).read_bytes())
    outcome, status = run(path, store_dir)
    assert status["a"] == "executed" and status["c"] == "cached"
    assert any("another entry" in m for m in outcome.logs)


def test_provenance_records_leave_digests_and_objects_untouched(tmp_path, store_dir):
    from weightflow.dsl.format.checkpoint import digest_directory
    from weightflow.dsl.store.content import Store

    path = write_pipeline(tmp_path, "weightflow: 1\nsteps:\n  x1: {op: note, text: same, salt: 1}\n"
                          "  x2: {op: note, text: same, salt: 2}\n")
    run(path, store_dir)
    lock = lock_of(path)
    digest = lock["x1"]["digest"]
    obj = _obj(store_dir, digest)
    assert sorted(p.name for p in obj.iterdir()) == ["note.txt", "weightflow.json"]
    assert digest_directory(obj) == digest
    records = sorted((store_dir / "manifests" / digest[:2] / digest).glob("*.json"))
    assert sorted(p.stem for p in records) == sorted([lock["x1"]["key"], lock["x2"]["key"]])
    assert {json.loads(p.read_text())["step"] for p in records} == {"x1", "x2"}
    s = Store(store_dir)
    assert s.lookup(lock["x1"]["key"]).digest == s.lookup(lock["x2"]["key"]).digest == digest


def test_a_store_from_before_the_records_is_backfilled_not_recomputed(tmp_path, store_dir):
    import shutil

    path = write_pipeline(tmp_path, NOTES)
    run(path, store_dir)
    shutil.rmtree(store_dir / "manifests")
    (store_dir / "format").unlink(missing_ok=True)
    outcome, status = run(path, store_dir)
    assert set(status.values()) == {"cached"} and not any("corrupted" in m for m in outcome.logs)
    for step in ("a", "b", "c"):
        e = lock_of(path)[step]
        assert (store_dir / "manifests" / e["digest"][:2] / e["digest"] / f"{e['key']}.json").is_file()


# -- 10: weightflow verify, verify: always --------------------------------------------

def _verify(store_dir, *args, capsys) -> tuple[int, dict]:
    capsys.readouterr()
    rc = _cli("verify", "--cache-dir", store_dir, "--json", *args)
    return rc, json.loads(capsys.readouterr().out)


def test_verify_deep_finds_corruption_that_keeps_the_mtime_and_repair_discards_it(tmp_path, store_dir,
                                                                                   capsys):
    path = write_pipeline(tmp_path, NOTES)
    run(path, store_dir)
    lock = lock_of(path)
    rc, doc = _verify(store_dir, capsys=capsys)
    assert rc == 0 and doc["ok"] and doc["checked"] == 3 and doc["problems"] == []
    _flip_keep_stat(_obj(store_dir, lock["b"]["digest"]) / "note.txt", 1)
    rc, doc = _verify(store_dir, capsys=capsys)
    assert rc == 0  # the memo trusts unchanged (size, mtime, inode): the documented trade-off
    rc, doc = _verify(store_dir, "--deep", capsys=capsys)
    assert rc == 1 and not doc["ok"] and doc["deep"]
    [p] = doc["problems"]
    assert (p["problem"], p["step"], p["pipeline"], p["key"]) == \
        ("corrupt-object", "b", str(path.resolve()), lock["b"]["key"])
    capsys.readouterr()
    assert _cli("verify", "--cache-dir", store_dir, "--deep") == 1
    text = capsys.readouterr().out
    assert "corrupt-object: step 'b'" in text and str(path.resolve()) in text
    rc, doc = _verify(store_dir, "--deep", "--repair", capsys=capsys)
    assert rc == 0 and doc["problems"][0]["repaired"]
    assert not _obj(store_dir, lock["b"]["digest"]).exists()
    assert not _action(store_dir, lock["b"]["key"]).exists()
    assert _verify(store_dir, "--deep", capsys=capsys)[0] == 0
    _, status = run(path, store_dir)
    assert status == {"a": "cached", "b": "executed", "c": "cached"}


def test_verify_only_the_named_pipelines(tmp_path, store_dir, capsys):
    one = write_pipeline(tmp_path, NOTES, "one.yaml")
    two = write_pipeline(tmp_path, "weightflow: 1\nsteps:\n  z: {op: note, text: zeta}\n", "two.yaml")
    run(one, store_dir)
    run(two, store_dir)
    z = lock_of(two)["z"]
    _flip_keep_stat(_obj(store_dir, z["digest"]) / "note.txt", 0)
    rc, doc = _verify(store_dir, "--deep", one, capsys=capsys)
    assert rc == 0 and doc["checked"] == 3
    rc, doc = _verify(store_dir, "--deep", two.with_suffix(".lock"), capsys=capsys)
    assert rc == 1 and [(p["step"], p["problem"]) for p in doc["problems"]] == [("z", "corrupt-object")]
    assert _cli("verify", "--cache-dir", store_dir, tmp_path / "missing.yaml") == 2


def test_verify_reports_and_repairs_an_action_pointing_at_the_wrong_object(tmp_path, store_dir, capsys):
    path = write_pipeline(tmp_path, NOTES)
    run(path, store_dir)
    lock = lock_of(path)
    apath = _action(store_dir, lock["c"]["key"])
    doc = json.loads(apath.read_text())
    doc["digest"] = lock["a"]["digest"]
    apath.write_text(json.dumps(doc))
    rc, out = _verify(store_dir, capsys=capsys)
    assert rc == 1 and [(p["step"], p["problem"]) for p in out["problems"]] == [("c", "unrecorded")]
    rc, out = _verify(store_dir, "--repair", capsys=capsys)
    assert rc == 0 and not apath.exists() and _obj(store_dir, lock["a"]["digest"]).is_dir()


@pytest.mark.parametrize("how", ["pipeline", "env"])
def test_verify_always_rehashes_every_cache_hit(tmp_path, store_dir, monkeypatch, how):
    text = NOTES if how == "env" else "verify: always\n" + NOTES
    path = write_pipeline(tmp_path, text)
    run(path, store_dir)
    lock = lock_of(path)
    _flip_keep_stat(_obj(store_dir, lock["b"]["digest"]) / "note.txt", 0)
    if how == "env":
        _, status = run(path, store_dir)
        assert status["b"] == "cached"  # without the setting the memo is trusted
        monkeypatch.setenv("WEIGHTFLOW_VERIFY", "always")
    outcome, status = run(path, store_dir)
    assert status == {"a": "cached", "b": "executed", "c": "cached"}
    assert any("corrupted" in m for m in outcome.logs)
    assert (_obj(store_dir, lock["b"]["digest"]) / "note.txt").read_text() == "beta"


def test_export_rehashes_with_verify_always(tmp_path, store_dir, monkeypatch, capsys):
    path = write_pipeline(tmp_path, NOTES)
    run(path, store_dir)
    _flip_keep_stat(_obj(store_dir, lock_of(path)["a"]["digest"]) / "note.txt", 0)
    monkeypatch.setenv("WEIGHTFLOW_VERIFY", "always")
    assert _cli("export", path, "a", tmp_path / "out", "--cache-dir", store_dir) == 2
    assert not (tmp_path / "out").exists()
    assert "no cached output" in capsys.readouterr().err


def test_verify_always_rehashes_an_op_input_right_before_it_is_read(tmp_path, store_dir):
    from weightflow.dsl.lang.diagnostics import StepFailed

    # 'x' corrupts a's object in place after a was looked up; c then reads a
    text = ("weightflow: 1\nsteps:\n  a: {op: note, text: alpha}\n"
            "  x: {op: note, text: spoiler, spoil: a}\n  c: {op: note, text: gamma, src: a, spoil: x}\n")
    path = write_pipeline(tmp_path, "verify: always\n" + text)
    with pytest.raises(StepFailed) as exc:
        run(path, store_dir)
    assert "input 'a'" in str(exc.value) and "corrupted" in str(exc.value)
    # without verify: always the op reads the corrupt input
    path = write_pipeline(tmp_path, text, "plain.yaml")
    run(path, tmp_path / "other-cache")
    c = lock_of(path)["c"]["digest"]
    assert (_obj(tmp_path / "other-cache", c) / "note.txt").read_text() == "gamma+`lpha"


def test_verify_key_of_the_pipeline_is_checked(tmp_path):
    from weightflow.dsl.lang.diagnostics import PipelineError
    from weightflow.dsl.lang.pipeline import load_pipeline

    assert load_pipeline(write_pipeline(tmp_path, "verify: always\n" + NOTES)).verify == "always"
    assert load_pipeline(write_pipeline(tmp_path, NOTES)).verify == "changed"
    with pytest.raises(PipelineError) as exc:
        load_pipeline(write_pipeline(tmp_path, "verify: sometimes\n" + NOTES))
    assert "'verify' must be one of changed, always" in str(exc.value)


@pytest.mark.parametrize("command", [["verify"], ["verify", "--deep"], ["gc", "--dry-run"]])
def test_verify_and_gc_do_not_import_torch(tmp_path, store_dir, command):
    path = write_pipeline(tmp_path, NOTES)
    run(path, store_dir)
    code = f"""
        import sys, io, contextlib
        from weightflow.dsl.cli import main
        with contextlib.redirect_stdout(io.StringIO()):
            rc = main({command + ['--cache-dir', str(store_dir)]!r})
        heavy = sorted(m for m in ("torch", "transformers", "safetensors.torch", "numpy") if m in sys.modules)
        print(rc, heavy)
    """
    proc = _python(code)
    out, err = proc.communicate(timeout=120)
    assert out.strip() == "0 []", out + err


def test_dead_temp_files_of_atomic_writes_are_removed_by_the_next_run(tmp_path, store_dir):
    """A kill between create and rename leaves ``.KEY.json.*.tmp``: never read, removed once an hour old."""
    path = write_pipeline(tmp_path, NOTES)
    run(path, store_dir)
    action_dir = next((store_dir / "actions").iterdir())
    old, fresh = action_dir / ".abc.json.x1.tmp", action_dir / ".def.json.x2.tmp"
    record = next((store_dir / "manifests").rglob("*.json")).parent / ".k.json.x3.tmp"
    for f in (old, fresh, record):
        f.write_text("{")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    os.utime(record, (time.time() - 7200, time.time() - 7200))
    _, status = run(path, store_dir)
    assert set(status.values()) == {"cached"}
    assert not old.exists() and not record.exists()
    assert fresh.exists()  # may belong to a live writer
