"""Shared fixtures: tiny random models saved as safetensors directories, and helpers
to write and run pipelines against a throw-away store."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

TINY_LLAMA = {
    "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256,
    "max_position_embeddings": 128,
}


def save_tiny_llama(path: Path, seed: int = 0, config: dict | None = None) -> Path:
    """A randomly initialised tiny Llama saved as a Hugging Face directory."""
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    cfg = dict(config or TINY_LLAMA)
    model_type = cfg.pop("model_type")
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(model_type, **cfg))
    model.save_pretrained(path)
    return path


def perturbed_copy(src: Path, dst: Path, seed: int, scale: float = 0.02) -> Path:
    """``src`` plus Gaussian noise on every float tensor: a stand-in for a fine-tune."""
    import torch
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tensors = load_file(src / "model.safetensors")
    out = {n: (t + scale * torch.randn(t.shape, generator=g)) if t.is_floating_point() else t
           for n, t in tensors.items()}
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    for f in src.glob("*.json"):
        (dst / f.name).write_text(f.read_text())
    return dst


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """base + two perturbed copies (ft_a, ft_b), plus an 'other' base of the same shape."""
    root = tmp_path_factory.mktemp("models")
    base = save_tiny_llama(root / "base", seed=0)
    return {
        "base": base,
        "ft_a": perturbed_copy(base, root / "ft_a", seed=1),
        "ft_b": perturbed_copy(base, root / "ft_b", seed=2),
        "other": save_tiny_llama(root / "other", seed=3),
    }


@pytest.fixture
def store_dir(tmp_path) -> Path:
    return tmp_path / "cache"


def write_pipeline(directory: Path, text: str, name: str = "pipeline.yaml") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def run(path: Path, store_dir: Path, **kwargs):
    """Run a pipeline file in-process; returns (outcome, {step: status})."""
    from weightflow.dsl.engine.runner import Runner
    from weightflow.dsl.lang.pipeline import load_pipeline
    from weightflow.dsl.store.content import Store

    logs: list[str] = []
    outcome = Runner(load_pipeline(path), Store(store_dir), log=logs.append, **kwargs).run()
    outcome.logs = logs
    return outcome, {s.name: s.status for s in outcome.steps}


def read_model(directory: Path) -> dict:
    """Every tensor of an artifact directory, dense (sparse deltas are decoded)."""
    from weightflow.ops.lib.tensors import Checkpoint

    ck = Checkpoint(directory)
    out = {n: ck.get(n).clone() for n in ck.names()}
    ck.close()
    return out


def lock_of(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.with_suffix(".lock").read_text())["steps"]


def config_of(directory: Path) -> dict:
    return json.loads((Path(directory) / "config.json").read_text())


# -- a loopback S3 server (moto) for the remote-store and Ray tests -------------------

class S3Server:
    """A running moto S3 server on 127.0.0.1 (see the ``s3_server`` fixture)."""

    bucket = "weightflow-test"

    def __init__(self, endpoint: str):
        self.endpoint = endpoint  # http://127.0.0.1:PORT

    def url(self, prefix: str = "store") -> str:
        """An ``s3://`` URL under the test bucket (which exists)."""
        return f"s3://{self.bucket}/{prefix.strip('/')}"

    def reset(self) -> None:
        """Forget every bucket and object (moto's reset API), then recreate the bucket."""
        import urllib.request

        urllib.request.urlopen(urllib.request.Request(f"{self.endpoint}/moto-api/reset", method="POST"),
                               timeout=10).close()
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1").create_bucket(Bucket=self.bucket)


@pytest.fixture(scope="session")
def _moto_server():
    """One moto server for the session, on a free loopback port."""
    pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_server(_moto_server, monkeypatch) -> S3Server:
    """A loopback S3 server (moto, real HTTP), reset to one empty bucket for this test.

    Yields an object with ``.endpoint`` (``http://127.0.0.1:PORT``), ``.bucket`` and
    ``.url(prefix)`` (``s3://BUCKET/PREFIX``).  Sets the environment so that s3fs and
    botocore in this process and in subprocesses use it: fake credentials
    (``AWS_ACCESS_KEY_ID=testing`` ...), ``AWS_ENDPOINT_URL`` and
    ``FSSPEC_S3_ENDPOINT_URL``; and clears s3fs's instance cache so no client from an
    earlier test (with stale listings) is reused.
    """
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                        "AWS_ENDPOINT_URL": _moto_server, "FSSPEC_S3_ENDPOINT_URL": _moto_server}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    server = S3Server(_moto_server)
    server.reset()
    return server


@pytest.fixture
def cli(capsys):
    """Run the CLI in-process: ``cli(*args) -> (exit status, stdout, stderr)`` (a test
    module that defines its own ``cli`` function uses that one instead)."""
    from weightflow.dsl.cli import main

    def call(*args):
        capsys.readouterr()
        rc = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return rc, out, err
    return call
