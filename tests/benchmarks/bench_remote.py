"""Remote-store benchmark: upload/download throughput to a loopback S3 (moto) for a
checkpoint of ``--size-gb`` GB, through weightflow's remote store vs a plain copy.

Run it as a script (not collected by pytest)::

    .venv/bin/python tests/benchmarks/bench_remote.py [--size-gb 1.0] [--out bench-results/remote.json]

What it measures
- The checkpoint: random float32 safetensors shards (``--shard-mb`` each) totalling
  ``--size-gb`` GB, written with safetensors' numpy API (no torch).
- weightflow upload: ``Store.upload`` of the published entry (every file, the
  completion marker, the provenance record, the conditional action write).
- weightflow download: ``Store.lookup`` from a second, empty local store: every file,
  then the digest check (a full re-hash of the object) and the local publish.  The
  re-hash is timed apart too, so the transfer itself can be compared.
- plain copy: ``s3fs`` ``put_file`` / ``get_file`` of the same files through the same
  client (what ``aws s3 cp --recursive`` does: no verification beyond the transport's).
The moto server runs in its own process (``python -m moto.server``) on 127.0.0.1, so
the server's work does not share this process's GIL; it keeps objects in memory, so it
needs about twice the checkpoint in RAM.  Units: MB = 1e6 bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_moto(port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1).close()
            return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the moto server did not start")


def _make_checkpoint(out: Path, size_gb: float, shard_mb: int) -> int:
    """Random float32 shards totalling ``size_gb`` GB in ``out``; the bytes written."""
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    total = int(size_gb * 1e9)
    per_shard = shard_mb * 1_000_000 // 4
    written, i = 0, 0
    while written < total:
        n = min(per_shard, (total - written) // 4) or 1
        save_file({f"layer{i}.weight": rng.standard_normal(n, dtype=np.float32)},
                  str(out / f"model-{i:05d}.safetensors"))
        written += n * 4
        i += 1
    (out / "config.json").write_text(json.dumps({"model_type": "synthetic", "shards": i}))
    return sum(f.stat().st_size for f in out.iterdir())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gb", type=float, default=1.0)
    ap.add_argument("--shard-mb", type=int, default=200)
    ap.add_argument("--out", default="bench-results/remote.json")
    args = ap.parse_args()

    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint,
                       "FSSPEC_S3_ENDPOINT_URL": endpoint})
    moto = _start_moto(port)
    work = Path(tempfile.mkdtemp(prefix="wf-bench-remote-"))
    try:
        import s3fs

        from weightflow.dsl.format.checkpoint import digest_directory
        from weightflow.dsl.store.content import Store

        fs = s3fs.S3FileSystem()
        fs.mkdir("bench")
        a = Store(work / "a", remote="s3://bench/wf")
        with a.staging() as staged:
            size = _make_checkpoint(staged, args.size_gb, args.shard_mb)
            digest = digest_directory(staged)
            key = "be" * 32
            a.remote = None  # publish locally only: the upload is timed on its own below
            entry = a.publish(key, staged, digest, {"step": "ckpt", "kind": "model"})
        a = Store(work / "a", remote="s3://bench/wf")
        t0 = time.perf_counter()
        a.upload(entry)
        wf_up = time.perf_counter() - t0

        b = Store(work / "b", remote="s3://bench/wf")
        t0 = time.perf_counter()
        got = b.lookup(key)
        wf_down = time.perf_counter() - t0
        assert got is not None and got.digest == digest
        t0 = time.perf_counter()
        digest_directory(got.path)  # the verification part of a download, alone (page cache warm)
        rehash = time.perf_counter() - t0

        files = sorted(p for p in entry.path.iterdir() if p.is_file())
        t0 = time.perf_counter()
        for f in files:
            fs.put_file(str(f), f"bench/plain/{f.name}")
        plain_up = time.perf_counter() - t0
        dest = work / "plain-get"
        dest.mkdir()
        t0 = time.perf_counter()
        for f in files:
            fs.get_file(f"bench/plain/{f.name}", str(dest / f.name))
        plain_down = time.perf_counter() - t0

        mb = size / 1e6
        doc = {
            "size_bytes": size, "files": len(files), "shard_mb": args.shard_mb,
            "weightflow_upload_s": round(wf_up, 3), "weightflow_upload_MBps": round(mb / wf_up, 1),
            "weightflow_download_s": round(wf_down, 3), "weightflow_download_MBps": round(mb / wf_down, 1),
            "download_rehash_s": round(rehash, 3),
            "plain_upload_s": round(plain_up, 3), "plain_upload_MBps": round(mb / plain_up, 1),
            "plain_download_s": round(plain_down, 3), "plain_download_MBps": round(mb / plain_down, 1),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
            "server": "moto (python -m moto.server) on 127.0.0.1, in-memory",
        }
        print(f"checkpoint: {mb:.0f} MB in {len(files)} files")
        print(f"upload:   weightflow {doc['weightflow_upload_MBps']:8.1f} MB/s   plain s3fs put "
              f"{doc['plain_upload_MBps']:8.1f} MB/s")
        print(f"download: weightflow {doc['weightflow_download_MBps']:8.1f} MB/s   plain s3fs get "
              f"{doc['plain_download_MBps']:8.1f} MB/s   (weightflow's includes the digest check; "
              f"re-hash alone {rehash:.2f} s)")
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {out}")
    finally:
        moto.terminate()
        moto.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
