"""Hardening of `load` and the safetensors readers (issue 10, "Trust I").

* a model directory's own Python code (tokenizer/config ``auto_map``) never runs unless the
  pipeline says ``trust_remote_code: true``, and weightflow never reads stdin (so
  ``echo y | weightflow run`` cannot answer transformers' "run the custom code?" prompt);
* a load never silently gives random weights: every backbone tensor comes from the files
  with the right shape and a float dtype; only a new head is initialised, and the manifest
  (and ``weightflow show``) says which tensors and from which seed;
* hand-crafted broken safetensors files (header length, offsets, sparse metadata) are
  clear errors naming the file and the tensor;
* symbolic links out of a model directory are refused unless ``follow_symlinks: true``;
  the Hugging Face cache layout (snapshots/<sha>/file -> ../../blobs/<hash>) still loads.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import read_model, save_tiny_llama, write_pipeline
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
SHA = "89abcdef0123456789abcdef0123456789abcdef"


def wf(args, tmp_path, stdin: str | None = None, env_extra: dict | None = None):
    """`weightflow ARGS` in a subprocess; HF caches (and their dynamic-module folder) in tmp."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf-home"), "HF_MODULES_CACHE": str(tmp_path / "hf-modules"),
           "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    env.pop("WEIGHTFLOW_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "weightflow", *map(str, args)], input=stdin,
                          stdin=None if stdin is not None else subprocess.DEVNULL,
                          capture_output=True, text=True, env=env, timeout=300)


def assert_clean_failure(res, *needles, code=(1, 2)):
    """Failed with a clear message (no traceback, no 'internal error'), naming ``needles``."""
    assert res.returncode in code, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr and "internal error" not in res.stderr, res.stderr
    for n in needles:
        assert n in res.stderr, (n, res.stderr)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama", seed=0)


def model_copy(src: Path, dst: Path, tensors: dict | None = None) -> Path:
    shutil.copytree(src, dst)
    if tensors is not None:
        save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def load_step(tmp_path, source, extra: str = "", out: bool = True) -> Path:
    text = f"weightflow: 1\nsteps:\n  m: {{op: load, source: '{source}'{extra}}}\n"
    if out:
        text += "outputs: {m: out/m}\n"
    return write_pipeline(tmp_path, text)


def manifest_of(tmp_path, path, store) -> dict:
    res = wf(["show", path, "m", "--json", "--cache-dir", store], tmp_path)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)["manifest"]


# -- 2. a model's own code never runs --------------------------------------------------

EVIL = "open({marker!r}, 'a').write('ran\\n')\nfrom transformers import PreTrainedTokenizerFast as EvilTokenizer\n"


def evil_dir(tmp_path: Path, tiny: Path, config_code: bool = False) -> tuple[Path, Path]:
    """A tiny model whose tokenizer (and, with ``config_code``, config) names a module in the
    directory that leaves a marker file when imported."""
    d = model_copy(tiny, tmp_path / "evil")
    marker = tmp_path / "MARKER"
    (d / "evil.py").write_text(EVIL.format(marker=str(marker)))
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", None]}, "tokenizer_class": "EvilTokenizer"}))
    (d / "tokenizer.json").write_text("{}")
    if config_code:
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(model_type="evilnet", architectures=["EvilForCausalLM"],
                   auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilForCausalLM",
                             "AutoModelForSequenceClassification": "evil.EvilForCausalLM"})
        (d / "config.json").write_text(json.dumps(cfg))
    return d, marker


@pytest.mark.parametrize("stdin", ["y\n", None], ids=["yes-on-stdin", "no-stdin"])
def test_custom_tokenizer_code_never_runs(tmp_path, tiny, stdin):
    src, marker = evil_dir(tmp_path, tiny)
    path = load_step(tmp_path, src, ", task: sequence-classification, num_labels: 2")
    res = wf(["run", path, "--cache-dir", tmp_path / "cache"], tmp_path, stdin=stdin)
    assert not marker.exists(), "the directory's tokenizer code ran"
    assert "Do you wish to run the custom code" not in res.stdout + res.stderr
    assert res.returncode == 0, res.stderr  # the model loads; its custom tokenizer is left out, said so
    assert "Traceback" not in res.stderr and "tokenizer" in res.stderr and "trust_remote_code" in res.stderr
    assert (tmp_path / "out" / "m" / "model.safetensors").is_file()


@pytest.mark.parametrize("stdin", ["y\n", None], ids=["yes-on-stdin", "no-stdin"])
def test_custom_config_code_never_runs_and_is_a_clear_error(tmp_path, tiny, stdin):
    src, marker = evil_dir(tmp_path, tiny, config_code=True)
    path = load_step(tmp_path, src, ", task: sequence-classification, num_labels: 2")
    res = wf(["run", path, "--cache-dir", tmp_path / "cache"], tmp_path, stdin=stdin)
    assert not marker.exists(), "the directory's config/model code ran"
    assert_clean_failure(res, "step 'm'", str(src), "trust_remote_code")


def test_helpers_on_stored_models_never_run_custom_code(tmp_path, tiny):
    """The ops' own loaders (tokenizer, model, training model) refuse the custom code too."""
    src, marker = evil_dir(tmp_path, tiny, config_code=True)
    script = f"""
import json, types
from pathlib import Path
from weightflow.dsl.lang.diagnostics import OpError
from weightflow.ops.lib import models, training
d = Path({str(src)!r})
out = {{}}
for name, call in [("load_tokenizer", lambda: models.load_tokenizer(d)),
                   ("load_model", lambda: models.load_model(d)),
                   ("train_load_model",
                    lambda: training.load_model(d, "causal-lm", types.SimpleNamespace(warn=print)))]:
    try:
        out[name] = repr(call())
    except OpError as exc:
        out[name] = "OpError: " + str(exc)
    except BaseException as exc:
        out[name] = "UNCLEAN " + type(exc).__name__ + ": " + str(exc)[:300]
print("RESULT" + json.dumps(out))
"""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf-home"), "HF_MODULES_CACHE": str(tmp_path / "hf-modules"),
           "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", script], input="y\ny\ny\n", capture_output=True, text=True,
                         env=env, timeout=300)
    assert not marker.exists(), res.stdout + res.stderr
    out = json.loads(res.stdout.split("RESULT", 1)[1])
    assert out["load_tokenizer"] == "None"  # an optional tokenizer that needs code: none
    for name in ("load_model", "train_load_model"):
        assert out[name].startswith("OpError: ") and "trust_remote_code" in out[name], out


def test_every_from_pretrained_call_says_trust_remote_code():
    """Static check: no transformers loading call in ops/ or dsl/ leaves the choice to a prompt."""
    offenders = []
    for f in sorted([*ROOT.joinpath("ops").glob("*.py"), *ROOT.joinpath("dsl").glob("*.py")]):
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    node.func.attr in ("from_pretrained", "from_config") and \
                    not any(k.arg == "trust_remote_code" for k in node.keywords):
                offenders.append(f"{f.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, f"calls without an explicit trust_remote_code: {offenders}"


def test_cli_never_reads_stdin(tmp_path):
    path = write_pipeline(tmp_path, "weightflow: 1\nsteps:\n  m: {op: load, config: {model_type: llama}}\n")
    script = ("import sys\nfrom weightflow.dsl.cli import main\nrc = main(['validate', sys.argv[1]])\n"
              "print('LEFT' + repr(sys.stdin.read()))\n")
    res = subprocess.run([sys.executable, "-c", script, str(path)], input="y\n", capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert "LEFT''" in res.stdout, res.stdout  # the command saw an empty stdin, never the 'y'


# -- 3. no silent random weights ---------------------------------------------------------

def tensors_of(tiny: Path) -> dict:
    return load_file(tiny / "model.safetensors")


def test_new_head_is_recorded_in_manifest_and_show(tmp_path, tiny):
    path = load_step(tmp_path, tiny, ", task: sequence-classification, num_labels: 3, init_seed: 7")
    store = tmp_path / "cache"
    res = wf(["run", path, "--cache-dir", store], tmp_path)
    assert res.returncode == 0, res.stderr
    info = manifest_of(tmp_path, path, store)["info"]
    assert info["initialised"] == {"tensors": ["score.weight"], "seed": 7}
    assert info["dropped"] == ["lm_head.weight"]  # the old head, not part of a classifier
    shown = wf(["show", path, "m", "--cache-dir", store], tmp_path).stdout
    assert "initialised" in shown and "score.weight" in shown and "seed 7" in shown
    got, want = read_model(tmp_path / "out" / "m"), tensors_of(tiny)
    assert set(got) == (set(want) - {"lm_head.weight"}) | {"score.weight"}
    assert all(torch.equal(got[k], want[k]) for k in want if k != "lm_head.weight")  # backbone as stored


def test_renamed_backbone_tensor_is_an_error(tmp_path, tiny):
    t = tensors_of(tiny)
    t["model.layers.0.self_attn.query.weight"] = t.pop("model.layers.0.self_attn.q_proj.weight")
    src = model_copy(tiny, tmp_path / "renamed", t)
    path = load_step(tmp_path, src, ", task: sequence-classification, num_labels: 2")
    res = wf(["run", path, "--cache-dir", tmp_path / "cache"], tmp_path)
    assert_clean_failure(res, "step 'm'", "'model.layers.0.self_attn.q_proj.weight'",
                         "'model.layers.0.self_attn.query.weight'", "model.safetensors", "randomly initialised")
    assert not (tmp_path / "out").exists()


def test_extra_backbone_tensor_is_an_error(tmp_path, tiny):
    t = tensors_of(tiny)
    t["model.layers.0.mlp.extra.weight"] = torch.zeros(4, 4)
    src = model_copy(tiny, tmp_path / "extra", t)
    path = load_step(tmp_path, src, ", task: sequence-classification, num_labels: 2")
    res = wf(["run", path, "--cache-dir", tmp_path / "cache"], tmp_path)
    assert_clean_failure(res, "'model.layers.0.mlp.extra.weight'", "model.safetensors", "not part of")


def test_integer_dtype_for_a_float_weight_is_an_error(tmp_path, tiny):
    half = {k: v.to(torch.float16) for k, v in tensors_of(tiny).items()}
    src = model_copy(tiny, tmp_path / "half", half)  # a float dtype converts as intended
    path = load_step(tmp_path, src, ", task: sequence-classification, num_labels: 2")
    res = wf(["run", path, "--cache-dir", tmp_path / "cache"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert torch.equal(read_model(tmp_path / "out" / "m")["model.norm.weight"], half["model.norm.weight"].float())
    t = tensors_of(tiny)
    t["model.norm.weight"] = t["model.norm.weight"].to(torch.int32)  # was silently cast to float
    src = model_copy(tiny, tmp_path / "ints", t)
    path = load_step(tmp_path, src, ", task: sequence-classification, num_labels: 2", out=False)
    res = wf(["run", path, "--cache-dir", tmp_path / "cache"], tmp_path)
    assert_clean_failure(res, "'model.norm.weight'", "model.safetensors", "I32", "floating-point")


def test_misshaped_tensor_is_an_error(tmp_path, tiny):
    t = tensors_of(tiny)
    t["model.norm.weight"] = t["model.norm.weight"][:32].clone()
    src = model_copy(tiny, tmp_path / "shape", t)
    path = load_step(tmp_path, src, ", task: sequence-classification, num_labels: 2")
    res = wf(["run", path, "--cache-dir", tmp_path / "cache"], tmp_path)
    assert_clean_failure(res, "'model.norm.weight'", "model.safetensors", "[32]", "[64]")


def test_directory_imported_as_is_is_checked_against_its_architecture(tmp_path, tiny):
    """No instantiation (the architecture already fits the task), still no silent gaps."""
    t = tensors_of(tiny)
    t["model.layers.1.mlp.up.weight"] = t.pop("model.layers.1.mlp.up_proj.weight")
    src = model_copy(tiny, tmp_path / "renamed", t)
    for task in ("auto", "causal-lm"):
        path = load_step(tmp_path, src, f", task: {task}")
        res = wf(["run", path, "--cache-dir", tmp_path / "cache"], tmp_path)
        assert_clean_failure(res, "'model.layers.1.mlp.up_proj.weight'", "'model.layers.1.mlp.up.weight'",
                             "LlamaForCausalLM")


LOAD_KEYS = {  # computed with the code before this change: load keys must not move
    "a": "5eb9b81006c1d0a760202f0ea96038de2b1acc6a7cf915f1d30b43d2fb826d45",
    "b": "652d827dd4f4e518fc94ba6cfb45897c63fe9b4460516881e46cf2d236db59d8",
    "c": "19b488cf03357758e4dd14f89adac814c4ed0bf657445e40b8e7b7d7a604c3e0",
}


def test_load_keys_are_unchanged(tmp_path):
    """follow_symlinks (default false) does not enter the key: existing lock files stay valid."""
    from weightflow.dsl.engine.planner import plan
    from weightflow.dsl.lang.pipeline import load_pipeline
    from weightflow.dsl.store.content import Store

    d = tmp_path / "src"
    d.mkdir()
    save_file({"w": torch.arange(12, dtype=torch.float32).reshape(3, 4)}, d / "model.safetensors",
              metadata={"format": "pt"})
    (d / "config.json").write_text('{"model_type": "toy", "architectures": ["Toy"]}\n')
    steps = ("  a: {op: load, source: ./src}\n  b: {op: load, source: ./src, task: causal-lm, dtype: bfloat16}\n"
             "  c: {op: load, config: {model_type: llama, hidden_size: 8}, init_seed: 3}\n")
    path = write_pipeline(tmp_path, "weightflow: 1\nsteps:\n" + steps)
    assert {s.name: s.key for s in plan(load_pipeline(path), Store(tmp_path / "cache"))} == LOAD_KEYS
    unfollowed = steps.replace("./src}", "./src, follow_symlinks: false}")
    path = write_pipeline(tmp_path, "weightflow: 1\nsteps:\n" + unfollowed)
    assert {s.name: s.key for s in plan(load_pipeline(path), Store(tmp_path / "cache"))} == LOAD_KEYS


# -- 3b. hand-crafted broken safetensors files ---------------------------------------------

def raw_file(path: Path, header: dict, data: bytes = b"", header_len: int | None = None) -> Path:
    """A safetensors file written byte by byte: 8-byte little-endian length, JSON, data."""
    raw = json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data)
    return path


def f32(*values) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


def entry(dtype, shape, a, b):
    return {"dtype": dtype, "shape": shape, "data_offsets": [a, b]}


BROKEN = {
    "header-past-end": ({"w": entry("F32", [2], 0, 8)}, f32(1, 2), 4096, ["header", "4096", "past the end"]),
    "offsets-past-end": ({"w": entry("F32", [4], 0, 16)}, f32(1, 2), None, ["'w'", "past the end"]),
    "overlap": ({"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 4, 12)}, f32(1, 2, 3), None,
                ["'a'", "'b'", "overlap"]),
    "size-vs-shape": ({"w": entry("F32", [4], 0, 8)}, f32(1, 2), None, ["'w'", "8 bytes", "16"]),
    "negative-offsets": ({"w": entry("F32", [2], 8, 0)}, f32(1, 2), None, ["'w'", "data_offsets"]),
    "bad-dtype": ({"w": entry("F33", [2], 0, 8)}, f32(1, 2), None, ["'w'", "F33"]),
    "bad-shape": ({"w": entry("F32", [-2], 0, 8)}, f32(1, 2), None, ["'w'", "shape"]),
    "not-json": (None, b"", None, ["header", "JSON"]),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_safetensors_is_a_clear_error(tmp_path, case):
    from weightflow.dsl.format.checkpoint import digest_safetensors, read_header
    from weightflow.dsl.lang.diagnostics import OpError
    from weightflow.ops.lib.tensors import Checkpoint

    header, data, n, needles = BROKEN[case]
    f = tmp_path / "m" / "model.safetensors"
    if header is None:
        f.parent.mkdir()
        f.write_bytes(struct.pack("<Q", 6) + b"{nope!")
    else:
        raw_file(f, header, data, n)
    with pytest.raises(OpError) as exc:
        Checkpoint(f.parent, label="model directory m")
    msg = str(exc.value)
    assert "model.safetensors" in msg and "model directory m" in msg, msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    for reader in (read_header, digest_safetensors):  # the torch-free readers (digests, inspect)
        with pytest.raises(ValueError, match="model.safetensors"):
            reader(f)


def test_broken_safetensors_fails_the_load_step_cleanly(tmp_path):
    d = tmp_path / "m"
    raw_file(d / "model.safetensors", {"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 4, 12)}, f32(1, 2, 3))
    (d / "config.json").write_text('{"model_type": "toy", "architectures": ["Toy"]}')
    path = load_step(tmp_path, d)
    res = wf(["run", path, "--cache-dir", tmp_path / "cache"], tmp_path)
    assert_clean_failure(res, "step 'm'", "model.safetensors", "'a'", "'b'", "overlap")


def sparse_file(path: Path, spec: dict, mask: bytes, mask_shape, values: bytes, values_shape,
                values_dtype="F32", meta: str | None = None) -> Path:
    header = {"__metadata__": {"format": "pt", "weightflow.sparse": meta if meta is not None else
                               json.dumps({"w": spec})},
              "w::mask": entry("U8", mask_shape, 0, len(mask)),
              "w::values": entry(values_dtype, values_shape, len(mask), len(mask) + len(values))}
    return raw_file(path, header, mask + values)


SPARSE_BROKEN = {
    # mask of 2 bytes for 8 elements (needs 1)
    "mask-length": (dict(spec={"dtype": "F32", "shape": [2, 4]}, mask=bytes([5, 0]), mask_shape=[2],
                         values=f32(1, 2), values_shape=[2]), ["'w'", "mask", "1 byte"]),
    # two bits set, three values
    "popcount": (dict(spec={"dtype": "F32", "shape": [2, 4]}, mask=bytes([5]), mask_shape=[1],
                      values=f32(1, 2, 3), values_shape=[3]), ["'w'", "3 values", "2"]),
    # three bits set, two values
    "too-few-values": (dict(spec={"dtype": "F32", "shape": [2, 4]}, mask=bytes([7]), mask_shape=[1],
                            values=f32(1, 2), values_shape=[2]), ["'w'", "2 values", "3"]),
    "values-dtype": (dict(spec={"dtype": "F32", "shape": [2, 4]}, mask=bytes([5]), mask_shape=[1],
                          values=b"\0" * 4, values_shape=[2], values_dtype="F16"), ["'w'", "F16", "F32"]),
    "more-values-than-elements": (dict(spec={"dtype": "F32", "shape": [1]}, mask=bytes([1]), mask_shape=[1],
                                       values=f32(1, 2), values_shape=[2]), ["'w'", "values"]),
    "meta-not-json": (dict(spec={}, mask=bytes([5]), mask_shape=[1], values=f32(1, 2), values_shape=[2],
                           meta="{not json"), ["weightflow.sparse"]),
    "meta-no-shape": (dict(spec={"dtype": "F32"}, mask=bytes([5]), mask_shape=[1], values=f32(1, 2),
                           values_shape=[2]), ["'w'", "shape"]),
    "meta-bad-dtype": (dict(spec={"dtype": "Q4", "shape": [8]}, mask=bytes([5]), mask_shape=[1],
                            values=f32(1, 2), values_shape=[2]), ["'w'", "Q4"]),
    "no-mask-tensor": (dict(spec={"dtype": "F32", "shape": [8]}, mask=bytes([5]), mask_shape=[1],
                            values=f32(1, 2), values_shape=[2],
                            meta=json.dumps({"w": {"dtype": "F32", "shape": [8]},
                                             "v": {"dtype": "F32", "shape": [8]}})), ["'v'", "v::mask"]),
}


@pytest.mark.parametrize("case", list(SPARSE_BROKEN))
def test_bogus_sparse_metadata_is_a_clear_error(tmp_path, case):
    from weightflow.dsl.lang.diagnostics import OpError
    from weightflow.ops.lib.tensors import Checkpoint

    good = sparse_file(tmp_path / "ok" / "delta.safetensors", {"dtype": "F32", "shape": [2, 4]},
                       bytes([0b00000101]), [1], f32(1.5, -2), [2])  # the hand-made format itself is right
    assert Checkpoint(good.parent).get("w").tolist() == [[1.5, 0, -2, 0], [0, 0, 0, 0]]
    kwargs, needles = SPARSE_BROKEN[case]
    f = sparse_file(tmp_path / "d" / "delta.safetensors", **kwargs)
    with pytest.raises(OpError) as exc:
        ck = Checkpoint(f.parent, label="delta d")
        for name in ck.names():  # some problems show only once the values are counted
            ck.get(name)
    msg = str(exc.value)
    assert "delta.safetensors" in msg and "delta d" in msg, msg
    for needle in needles:
        assert needle in msg, (needle, msg)


# -- 4. symbolic links ------------------------------------------------------------------------

def test_symlink_out_of_the_directory_is_refused(tmp_path, tiny):
    # links inside the directory, and the directory itself being a link, are fine
    real = model_copy(tiny, tmp_path / "real")
    (real / "sub").mkdir()
    (real / "sub" / "v.txt").write_text("x\n")
    (real / "vocab.txt").symlink_to("sub/v.txt")
    (tmp_path / "alias").symlink_to(real, target_is_directory=True)  # like examples/models/<name>
    path = load_step(tmp_path, tmp_path / "alias")
    res = wf(["run", path, "--cache-dir", tmp_path / "cache"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "out" / "m" / "vocab.txt").read_text() == "x\n"
    # a link out of it (vocab.txt -> /etc/passwd, say) is refused, before anything is read
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:secret\n")
    src = model_copy(tiny, tmp_path / "linked")
    (src / "vocab.txt").symlink_to(secret)
    path = load_step(tmp_path, src, out=False)
    res = wf(["run", path, "--cache-dir", tmp_path / "cache2"], tmp_path)
    assert_clean_failure(res, "step 'm'", "vocab.txt", str(secret), "follow_symlinks")
    stored = [f for f in (tmp_path / "cache2").rglob("*") if f.is_file()]
    assert not any(b"root:x:0:0:secret" in f.read_bytes() for f in stored)


def test_follow_symlinks_true_allows_links_out(tmp_path, tiny):
    secret = tmp_path / "shared-vocab.txt"
    secret.write_text("a\nb\n")
    src = model_copy(tiny, tmp_path / "linked")
    (src / "vocab.txt").symlink_to(secret)
    path = load_step(tmp_path, src, ", follow_symlinks: true")
    res = wf(["run", path, "--cache-dir", tmp_path / "cache"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "out" / "m" / "vocab.txt").read_text() == "a\nb\n"


def hub_cache(tmp_path: Path, tiny: Path) -> tuple[Path, Path]:
    """The HF cache layout: snapshots/<sha>/<file> -> ../../blobs/<hash>."""
    repo = tmp_path / "hub" / "models--acme--tiny"
    snap = repo / "snapshots" / SHA
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(tiny.iterdir())):
        blob = repo / "blobs" / f"blob{i:04d}"
        shutil.copyfile(f, blob)
        (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SHA)
    return repo, snap


def test_hub_cache_blob_links_load_but_links_out_of_the_repo_folder_do_not(tmp_path, tiny):
    repo, snap = hub_cache(tmp_path, tiny)
    env = {"HF_HUB_CACHE": str(tmp_path / "hub")}
    path = load_step(tmp_path, f"hf:acme/tiny@{SHA}")
    res = wf(["run", path, "--cache-dir", tmp_path / "cache"], tmp_path, env_extra=env)
    assert res.returncode == 0, res.stderr
    got, want = read_model(tmp_path / "out" / "m"), read_model(tiny)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    local = load_step(tmp_path, snap, out=False)  # the snapshot folder as a local directory: the same
    res = wf(["run", local, "--cache-dir", tmp_path / "cache2"], tmp_path)
    assert res.returncode == 0, res.stderr

    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0\n")
    (snap / "vocab.txt").symlink_to(secret)
    res = wf(["run", path, "--cache-dir", tmp_path / "cache3"], tmp_path, env_extra=env)
    assert_clean_failure(res, "step 'm'", "vocab.txt", str(secret))
    res = wf(["run", local, "--cache-dir", tmp_path / "cache4"], tmp_path)
    assert_clean_failure(res, "step 'm'", "vocab.txt", str(secret))
