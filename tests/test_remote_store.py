"""The remote store (dsl/store/remote.py): a local store as the read-through,
write-through cache of a shared one, on a loopback S3 server (moto) and on file://.

Two "machines" are two local stores (separate roots) sharing one remote; what moved
is counted by the remote's ``transfer`` and seen in which objects the local store holds.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml
from conftest import write_pipeline

from weightflow.dsl.format.checkpoint import digest_directory
from weightflow.dsl.lang.diagnostics import WeightflowError
from weightflow.dsl.store.content import Store
from weightflow.dsl.store.remote import Remote, redact_url

pytest.importorskip("fsspec")

PIPE = """
weightflow: 1
steps:
  base: {{op: load, source: {base}}}
  ft_a: {{op: load, source: {ft_a}}}
  delta_a: {{op: extract-delta, model: ft_a, base: base}}
  merged: {{op: merge, method: task-arithmetic, base: base, deltas: [delta_a], weights: [0.5]}}
outputs: {{merged: out/merged}}
"""


@pytest.fixture(params=["file", "s3"])
def remote_url(request, tmp_path) -> str:
    """One remote per test: a file:// directory, or a prefix on the loopback S3 server."""
    if request.param == "file":
        return f"file://{tmp_path / 'remote'}"
    return request.getfixturevalue("s3_server").url("wf")


def _pipeline(tmp_path: Path, tiny_models: dict) -> Path:
    return write_pipeline(tmp_path, PIPE.format(**{k: str(v) for k, v in tiny_models.items()}))


def _cli(*args, capsys=None) -> tuple[int, str, str]:
    """``weightflow ARGS`` in this process: (exit status, stdout, stderr)."""
    from weightflow.dsl.cli import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _local_objects(root: Path) -> set[str]:
    return {p.name for p in (root / "objects").glob("*/*") if p.is_dir()}


def _staged(store: Store, files: dict[str, bytes]):
    """A staging context with ``files`` written in it, and the content's digest."""
    cm = store.staging()
    out = cm.__enter__()
    for name, data in files.items():
        (out / name).write_bytes(data)
    return cm, out, digest_directory(out)


def _publish(store: Store, key: str, files: dict[str, bytes], step: str = "s"):
    cm, out, digest = _staged(store, files)
    try:
        return store.publish(key, out, digest, {"step": step, "kind": "model"})
    finally:
        cm.__exit__(None, None, None)


# -- the Done-when of issue 14 ----------------------------------------------------------

def test_second_machine_is_all_hits_and_downloads_only_the_export(tmp_path, tiny_models, remote_url, capsys):
    """Machine 1 (a subprocess) runs and uploads; machine 2 (this process, its own cache)
    runs the same pipeline: every step cached, the same lock, and only the exported
    step's object downloaded."""
    path = _pipeline(tmp_path, tiny_models)
    first = subprocess.run([sys.executable, "-m", "weightflow", "run", str(path), "-q", "--cache-dir",
                            str(tmp_path / "c1"), "--remote", remote_url], capture_output=True, text=True,
                           timeout=300)
    assert first.returncode == 0, first.stderr
    lock = path.with_suffix(".lock").read_text()
    locked = yaml.safe_load(lock)["steps"]
    remote = Remote(remote_url)
    assert {k for k, _ in remote.actions()} == {e["key"] for e in locked.values()}
    (tmp_path / "out").rename(tmp_path / "out-machine1")

    store2 = Store(tmp_path / "c2", remote=remote_url, lazy_fetch=True)
    from weightflow.dsl.engine.runner import Runner
    from weightflow.dsl.lang.pipeline import load_pipeline

    outcome = Runner(load_pipeline(path), store2, log=lambda m: None).run()
    assert {s.status for s in outcome.steps} == {"cached"}
    assert path.with_suffix(".lock").read_text() == lock
    merged = locked["merged"]["digest"]
    assert store2.remote.transfer.downloaded == [merged]  # not base, ft_a, delta_a
    assert _local_objects(tmp_path / "c2") == {merged}
    assert store2.remote.transfer.download_bytes == sum(
        f.stat().st_size for f in (tmp_path / "c2" / "objects" / merged[:2] / merged).rglob("*") if f.is_file())
    assert (tmp_path / "out" / "merged" / "model.safetensors").is_file()


def test_concurrent_publishers_of_one_key_agree_on_one_digest(tmp_path, remote_url):
    """Two machines publish the same key with different bytes at once: one action entry
    on the remote, and both end with (and return) the winner's digest."""
    key = "c0" * 32
    stores = [Store(tmp_path / f"m{i}", remote=remote_url) for i in range(2)]
    staged = [_staged(s, {"w.bin": f"machine {i}".encode()}) for i, s in enumerate(stores)]
    barrier = threading.Barrier(2)
    results: list = [None, None]

    def publish(i: int) -> None:
        cm, out, digest = staged[i]
        barrier.wait()
        results[i] = stores[i].publish(key, out, digest, {"step": "ft", "kind": "model"})
        cm.__exit__(None, None, None)

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    remote = Remote(remote_url)
    assert [k for k, _ in remote.actions()] == [key]
    winner = remote.read_action(key)["digest"]
    assert winner in {s[2] for s in staged}
    assert [r.digest for r in results] == [winner, winner]
    for s in stores:  # the loser's local entry was replaced by the winner's, content checked
        entry = s.lookup(key)
        assert entry.digest == winner and s.verify(entry, deep=True)


def test_an_upload_that_fails_before_the_action_leaves_no_entry(tmp_path, remote_url, monkeypatch):
    key = "d1" * 32
    a = Store(tmp_path / "a", remote=remote_url)

    def killed(self, path, data):
        raise OSError("connection reset (simulated kill after the objects were uploaded)")

    monkeypatch.setattr(Remote, "create_exclusive", killed)
    with pytest.raises(WeightflowError, match="local entry is kept"):
        _publish(a, key, {"w.bin": b"x" * 1000})
    monkeypatch.undo()
    assert a.lookup(key) is not None  # published locally
    b = Store(tmp_path / "b", remote=remote_url)
    assert not b.remote_has(key)
    assert b.lookup(key) is None and b.where(key) == "missing"
    assert list(b.remote.actions()) == []


def test_a_killed_upload_process_leaves_no_entry(tmp_path, remote_url):
    """A real SIGKILL: the publishing process dies while its object is being uploaded."""
    key = "d2" * 32
    code = f"""
import os, signal
from weightflow.dsl.store.content import Store
from weightflow.dsl.format.checkpoint import digest_directory
s = Store({str(tmp_path / 'a')!r}, remote={remote_url!r})
calls = []
orig = s.remote.fs.put_file
def put_then_die(*a, **k):
    orig(*a, **k)
    calls.append(1)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
s.remote.fs.put_file = put_then_die
with s.staging() as out:
    for i in range(4):
        (out / f"shard{{i}}.bin").write_bytes(os.urandom(1000))
    s.publish({key!r}, out, digest_directory(out), {{"step": "s", "kind": "model"}})
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == -9, res.stderr
    b = Store(tmp_path / "b", remote=remote_url)
    assert not b.remote_has(key) and b.lookup(key) is None
    remote = Remote(remote_url)
    digests = list(remote.objects())
    assert len(digests) == 1 and remote.read_marker(digests[0]) is None  # partial, never trusted


def test_a_corrupt_remote_object_is_detected_and_reuploaded(tmp_path, remote_url):
    key = "e1" * 32
    a = Store(tmp_path / "a", remote=remote_url)
    good = _publish(a, key, {"w.bin": b"good bytes" * 100}, step="merged")
    remote = Remote(remote_url)
    remote.fs.pipe_file(remote.object_dir(good.digest) + "/w.bin", b"evil bytes" * 100)
    warnings: list[str] = []
    b = Store(tmp_path / "b", remote=remote_url, warn=warnings.append)
    assert b.lookup(key) is None  # not used: a miss, so the step recomputes
    assert len(warnings) == 1 and key[:12] in warnings[0] and "merged" in warnings[0]
    assert "corrupted" in warnings[0] and _local_objects(tmp_path / "b") == set()
    again = _publish(b, key, {"w.bin": b"good bytes" * 100}, step="merged")  # the recomputation
    assert again.digest == good.digest
    c = Store(tmp_path / "c", remote=remote_url)
    entry = c.lookup(key)
    assert entry is not None and (entry.path / "w.bin").read_bytes() == b"good bytes" * 100


def test_a_run_that_meets_a_corrupt_remote_object_fails_clearly_then_recomputes(
        tmp_path, tiny_models, remote_url, capsys):
    """Fetched on first use (lazily), a corrupt exported object fails that run naming the
    step, is marked bad on the remote; the rerun recomputes and uploads good bytes."""
    path = _pipeline(tmp_path, tiny_models)
    assert _cli("run", path, "-q", "--cache-dir", tmp_path / "c1", "--no-export", "--remote", remote_url,
                capsys=capsys)[0] == 0
    digest = yaml.safe_load(path.with_suffix(".lock").read_text())["steps"]["merged"]["digest"]
    remote = Remote(remote_url)
    victim = sorted(remote.read_marker(digest)["files"])[0]
    remote.fs.pipe_file(f"{remote.object_dir(digest)}/{victim}", b"garbage")
    code, _, err = _cli("run", path, "-q", "--cache-dir", tmp_path / "c2", "--remote", remote_url, capsys=capsys)
    assert code == 2 and "step 'merged'" in err and "corrupted" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "merged").exists()
    code, out, err = _cli("run", path, "--cache-dir", tmp_path / "c2", "--remote", remote_url, capsys=capsys)
    assert code == 0 and "1 executed, 3 cached" in out and err.count("recomputing it") == 1
    code, out, _ = _cli("verify", "--remote", remote_url, "--deep", "--cache-dir", tmp_path / "c3", "--json",
                        capsys=capsys)
    assert code == 0 and json.loads(out)["ok"]


# -- the CLI: push, pull, plan/status WHERE, gc and verify on the remote ---------------------

def test_push_pull_and_where(tmp_path, tiny_models, remote_url, capsys):
    path = _pipeline(tmp_path, tiny_models)
    c1, c2 = tmp_path / "c1", tmp_path / "c2"
    assert _cli("run", path, "-q", "--cache-dir", c1, "--no-export", capsys=capsys)[0] == 0  # no remote
    lock = yaml.safe_load(path.with_suffix(".lock").read_text())["steps"]
    code, out, _ = _cli("push", path, "--cache-dir", c1, "--remote", remote_url, "--json", capsys=capsys)
    pushed = json.loads(out)
    assert code == 0 and pushed["moved"] == 4 and all(r["state"] == "pushed" for r in pushed["steps"])
    assert pushed["bytes"] > 0
    code, out, _ = _cli("push", path, "--cache-dir", c1, "--remote", remote_url, capsys=capsys)
    assert code == 0 and "pushed 0 entries" in out

    code, out, _ = _cli("status", path, "--cache-dir", c2, "--remote", remote_url, "--json", capsys=capsys)
    assert code == 0 and {s["name"]: s["where"] for s in json.loads(out)["steps"]} == dict.fromkeys(lock, "remote")
    code, out, _ = _cli("pull", path, "--cache-dir", c2, "--remote", remote_url, "--target", "delta_a",
                        "--json", capsys=capsys)
    pulled = {r["step"]: r["state"] for r in json.loads(out)["steps"]}
    assert code == 0 and pulled == {"base": "pulled", "ft_a": "pulled", "delta_a": "pulled"}
    assert _local_objects(c2) == {lock[n]["digest"] for n in pulled}
    code, out, _ = _cli("plan", path, "--cache-dir", c2, "--remote", remote_url, "--json", capsys=capsys)
    where = {s["name"]: s["where"] for s in json.loads(out)["steps"]}
    assert where == {"base": "local", "ft_a": "local", "delta_a": "local", "merged": "remote"}
    assert _local_objects(c2) == {lock[n]["digest"] for n in pulled}  # plan downloaded nothing
    code, out, _ = _cli("plan", path, "--cache-dir", c2, "--remote", remote_url, capsys=capsys)
    assert "WHERE" in out.splitlines()[0] and "remote only" not in out
    merged_row = next(line for line in out.splitlines() if line.startswith("merged"))
    assert merged_row.split()[2:4] == ["cached", "remote"]
    code, out, _ = _cli("plan", path, "--cache-dir", tmp_path / "c3", "--remote",
                        f"file://{tmp_path / 'empty-remote'}", "--json", capsys=capsys)
    assert {s["where"] for s in json.loads(out)["steps"]} == {"missing"}
    code, out, _ = _cli("export", path, "merged", tmp_path / "exported", "--cache-dir", tmp_path / "c4",
                        "--remote", remote_url, capsys=capsys)
    assert code == 0 and (tmp_path / "exported" / "model.safetensors").is_file()
    assert _local_objects(tmp_path / "c4") == {lock["merged"]["digest"]}  # only what the export needs


def test_gc_and_verify_on_the_remote(tmp_path, tiny_models, remote_url, capsys):
    path = _pipeline(tmp_path, tiny_models)
    c1 = tmp_path / "c1"
    assert _cli("run", path, "-q", "--cache-dir", c1, "--no-export", "--remote", remote_url, capsys=capsys)[0] == 0
    lock = yaml.safe_load(path.with_suffix(".lock").read_text())["steps"]
    code, out, _ = _cli("verify", "--remote", remote_url, "--cache-dir", c1, "--deep", "--json", capsys=capsys)
    doc = json.loads(out)
    assert code == 0 and doc["ok"] and doc["checked"] == 4 and doc["hashed_bytes"] > 0
    remote = Remote(remote_url)
    digest = lock["delta_a"]["digest"]
    victim = sorted(remote.read_marker(digest)["files"])[0]
    remote.fs.pipe_file(f"{remote.object_dir(digest)}/{victim}", b"truncated")
    code, out, _ = _cli("verify", "--remote", remote_url, "--cache-dir", c1, capsys=capsys)
    assert code == 1 and "corrupt-object: step 'delta_a'" in out

    # gc: the lock protects its entries; a dry run lists and removes nothing
    code, out, _ = _cli("gc", path, "--remote", remote_url, "--cache-dir", c1, "--older-than", "0",
                        "--json", capsys=capsys)
    assert code == 0 and json.loads(out)["actions"] == 0 and json.loads(out)["kept_by_lock"] == 4
    code, out, _ = _cli("gc", "--remote", remote_url, "--cache-dir", c1, "--older-than", "0", "--dry-run",
                        capsys=capsys)
    assert code == 0 and "would remove 4 entries and 4 objects" in out and "merged" in out
    assert len(list(remote.actions())) == 4
    code, out, _ = _cli("gc", "--remote", remote_url, "--cache-dir", c1, "--older-than", "0", capsys=capsys)
    assert code == 0 and "removed 4 entries and 4 objects" in out
    assert list(remote.actions()) == [] and list(remote.objects()) == []
    assert len(_local_objects(c1)) == 4  # the local store is untouched


def test_secrets_in_the_url_never_reach_lock_manifest_or_logs(tmp_path, tiny_models, s3_server, capsys):
    secret = "SUPERSECRET9f8e7d"
    url = f"s3://testing:{secret}@{s3_server.bucket}/wf"
    assert redact_url(url) == f"s3://{s3_server.bucket}/wf"
    assert secret not in redact_url(f"https://host/p?X-Amz-Signature={secret}#{secret}")
    path = _pipeline(tmp_path, tiny_models)
    code, out, err = _cli("run", path, "--cache-dir", tmp_path / "c1", "--remote", url, capsys=capsys)
    assert code == 0
    code2, out2, err2 = _cli("plan", path, "--cache-dir", tmp_path / "c2", "--remote", url, capsys=capsys)
    code3, out3, err3 = _cli("push", path, "--cache-dir", tmp_path / "c1", "--remote", url, capsys=capsys)
    assert code2 == 0 and code3 == 0 and f"s3://{s3_server.bucket}/wf" in out2
    for text in (out, err, out2, err2, out3, err3, path.with_suffix(".lock").read_text()):
        assert secret not in text
    for f in (tmp_path / "c1").rglob("*.json"):
        assert secret not in f.read_text()
    remote = Remote(url)
    for _key, action in remote.actions():
        assert secret not in remote.fs.cat_file(action).decode()


def test_pipeline_store_key_and_env(tmp_path, tiny_models, monkeypatch, capsys):
    """`store: {remote: URL}` in the pipeline, overridden by $WEIGHTFLOW_REMOTE, then --remote;
    a bad `store:` value is a clear error with its line."""
    base = PIPE.format(**{k: str(v) for k, v in tiny_models.items()})
    path = write_pipeline(tmp_path, base + f"store: {{remote: 'file://{tmp_path / 'from-file'}'}}\n")
    assert _cli("run", path, "-q", "--cache-dir", tmp_path / "c1", "--no-export", capsys=capsys)[0] == 0
    assert len(list(Remote(f"file://{tmp_path / 'from-file'}").actions())) == 4
    monkeypatch.setenv("WEIGHTFLOW_REMOTE", f"file://{tmp_path / 'from-env'}")
    assert _cli("push", path, "--cache-dir", tmp_path / "c1", capsys=capsys)[0] == 0
    assert len(list(Remote(f"file://{tmp_path / 'from-env'}").actions())) == 4
    bad = write_pipeline(tmp_path, base + "store: {remot: x}\n", "bad.yaml")
    code, _, err = _cli("validate", bad, capsys=capsys)
    assert code == 2 and "bad.yaml:8" in err and "unknown key 'remot' in 'store'" in err
    monkeypatch.delenv("WEIGHTFLOW_REMOTE")
    code, _, err = _cli("push", bad.with_name("pipeline.yaml"), "--cache-dir", tmp_path / "c1",
                        capsys=capsys)
    assert code == 0  # the file's own remote
    nothing = write_pipeline(tmp_path, base, "plain.yaml")
    code, _, err = _cli("pull", nothing, "--cache-dir", tmp_path / "c1", capsys=capsys)
    assert code == 2 and "needs a remote store" in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["plan", "status", "push", "pull"])
def test_remote_commands_that_run_no_model_do_not_import_torch(tmp_path, tiny_models, s3_server, command,
                                                               capsys):
    path = _pipeline(tmp_path, tiny_models)
    assert _cli("run", path, "-q", "--cache-dir", tmp_path / "c1", "--no-export", capsys=capsys)[0] == 0
    cache = tmp_path / ("c1" if command == "push" else "c2")
    args = [command, str(path), "--cache-dir", str(cache), "--remote", s3_server.url("wf")]
    if command == "pull":
        assert _cli("push", path, "--cache-dir", tmp_path / "c1", "--remote", s3_server.url("wf"),
                    capsys=capsys)[0] == 0
    code = ("import sys, io, contextlib\nfrom weightflow.dsl.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            f"    rc = main({args!r})\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'safetensors.torch', 'numpy') if m in sys.modules)\n"
            "print(rc, heavy)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.stdout.strip() == "0 []", res.stdout + res.stderr
