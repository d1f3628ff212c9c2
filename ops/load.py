"""``load``: bring a model into the store from outside.

Sources: a local Hugging Face model directory; ``hf:ORG/NAME[@REVISION]`` from the
hub (the revision is resolved to a commit and pinned in the key); a GGUF file
(dequantized by transformers); or ``config:`` + ``init_seed`` to build a randomly
initialised model (tests, demos).  Weights are read from safetensors only -- never
pickle -- and ``trust_remote_code`` stays off unless the pipeline says so (a directory's
own tokenizer or model code is then never run).  Files of the directory that are symbolic
links to places outside it are refused unless ``follow_symlinks: true`` (the HF cache's
snapshot -> blob links are fine).

Nothing is silently random: every tensor of the loaded architecture must come from the
files, with its shape and a floating-point dtype where a float is expected; only a new
head (``task`` naming a head the directory lacks) is initialised, from ``init_seed``, and
the step's manifest (``weightflow show``) lists those tensors and the ones dropped.

A local directory whose architecture already matches ``task`` is imported tensor by
tensor (memory-mapped, converted to ``dtype``) without instantiating the model; other
sources go through transformers once and are then imported the same way.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from weightflow.dsl.lang.diagnostics import OpError
from weightflow.dsl.lang.spec import Dtype, DtypeParam, Kind, OpSpec
from weightflow.ops.lib.layout import PICKLE_SUFFIXES, SIDE_FILE_GLOBS

HF_PREFIX = "hf:"
_HF = re.compile(r"^hf:(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+|[\w.-]+)(?:@(?P<rev>[\w./-]+))?$")
_SHA = re.compile(r"^[0-9a-f]{40}$")
TASK_SUFFIX = {"causal-lm": "ForCausalLM", "sequence-classification": "ForSequenceClassification"}


class LoadParams(DtypeParam):
    """Where the model comes from and how it is presented to later steps."""

    source: str | None = Field(None, description="local model directory, 'hf:ORG/NAME@REVISION', "
                               "or a .gguf file; relative to the pipeline file")
    gguf_file: str | None = Field(None, description="GGUF file name inside `source` (a directory)")
    config: dict[str, Any] | None = Field(None, description="transformers config mapping "
                                          "(with model_type) to build a randomly initialised model")
    init_seed: int = Field(0, ge=0, description="seed for random initialisation (config models, new heads)")
    task: Literal["auto", "causal-lm", "sequence-classification"] = "auto"
    num_labels: int | None = Field(None, ge=1, description="labels of a sequence-classification head")
    labels: list[str] | None = Field(None, min_length=1, description="names of the head's labels, in id order "
                                     "(sets num_labels); data labels are then matched by name")
    dtype: Dtype | None = Field(None, description="dtype of the stored weights (default: pipeline dtype)")
    trust_remote_code: bool = Field(False, description="allow a hub model's own Python code to run")
    follow_symlinks: bool = Field(False, description="read files of the model directory that are symbolic "
                                  "links to places outside it (refused by default)")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.source is None) == (self.config is None):
            raise ValueError("give exactly one of 'source' (a directory, hf:ORG/NAME, or .gguf file) "
                             "or 'config' (a model built from a config)")
        if self.source is not None and self.source.startswith(HF_PREFIX) and not _HF.match(self.source):
            raise ValueError(f"invalid hub source {self.source!r}: expected hf:ORG/NAME or hf:ORG/NAME@REVISION")
        if self.gguf_file is not None and (self.source is None or self.source.startswith(HF_PREFIX)):
            raise ValueError("'gguf_file' needs 'source' to be a local directory holding that file")
        if self.config is not None and not isinstance(self.config.get("model_type"), str):
            raise ValueError("'config' needs a 'model_type' (e.g. llama, bert, gpt2)")
        for name in ("num_labels", "labels"):
            if getattr(self, name) is not None and self.task != "sequence-classification":
                raise ValueError(f"'{name}' applies only with task: sequence-classification")
        if self.labels is not None:
            if len(set(self.labels)) != len(self.labels):
                raise ValueError(f"'labels' has duplicates: {self.labels}")
            if self.num_labels is not None and self.num_labels != len(self.labels):
                raise ValueError(f"num_labels: {self.num_labels} but {len(self.labels)} labels are named")
        return self


# -- where the source is ------------------------------------------------------

def _local(params: LoadParams, base_dir: Path) -> Path:
    p = Path(params.source).expanduser()
    return p if p.is_absolute() else (base_dir / p)


def _gguf_path(params: LoadParams, base_dir: Path) -> Path | None:
    if params.source is None or params.source.startswith(HF_PREFIX):
        return None
    src = _local(params, base_dir)
    if params.gguf_file:
        return src / params.gguf_file
    return src if src.suffix == ".gguf" else None


def resolve_hf(source: str) -> tuple[str, str]:
    """('org/name', commit sha) for an ``hf:`` source; a clear error when offline."""
    m = _HF.match(source)
    repo, rev = m.group("repo"), m.group("rev") or "main"
    if _SHA.match(rev):
        return repo, rev
    try:
        from huggingface_hub import HfApi
        info = HfApi().model_info(repo, revision=rev, timeout=15)
    except Exception as exc:  # offline, unknown repo, auth: all end the same way for the user
        raise OpError(
            f"cannot resolve {source} to a commit ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
            "the hub is unreachable or the repo/revision does not exist. Pin a 40-character commit "
            "sha (hf:ORG/NAME@<sha>) with the model in the local HF cache, or load a local directory"
        ) from None
    return repo, info.sha


def _local_files(src: Path) -> list[Path]:
    files = set(src.glob("*.safetensors"))
    for pattern in SIDE_FILE_GLOBS:
        files |= set(src.glob(pattern))
    return sorted(f for f in files if f.is_file())


def _link_roots(src: Path) -> list[Path]:
    """Where the files of ``src`` may resolve to: the directory itself, and for a snapshot in
    the Hugging Face cache (models--ORG--NAME/snapshots/<sha>) that repo's folder, whose
    blobs/ the snapshot's files link into."""
    roots = [src.resolve()]
    for p in (src, src.resolve()):
        if p.parent.name == "snapshots" and p.parent.parent.name.startswith("models--"):
            roots.append(p.parent.parent.resolve())
    return roots


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path == r or r in path.parents for r in roots)


def check_links(src: Path, params: LoadParams, files: list[Path] | None = None) -> None:
    """Refuse entries of ``src`` (or just ``files``) that resolve outside it, unless
    ``follow_symlinks``: a link like vocab.txt -> /etc/passwd would otherwise be copied into
    the store and every export."""
    if params.follow_symlinks:
        return
    roots = _link_roots(src)
    for entry in sorted(src.iterdir()) if files is None else files:
        try:
            target = entry.resolve()
        except (OSError, RuntimeError) as exc:  # a link loop
            raise OpError(f"{entry.name} in the model directory {src} is a symbolic link that does not "
                          f"resolve ({exc})") from None
        if not _inside(target, roots):
            raise OpError(f"{entry.name} in the model directory {src} is a symbolic link to {target}, "
                          "outside that directory; refusing to read it (set follow_symlinks: true on the "
                          "load step to allow links out of the directory)")


def fingerprint(params: LoadParams, env) -> dict:
    """Content of what will be loaded: file digests, or the pinned hub commit."""
    if params.config is not None:
        return {"config": True}
    gguf = _gguf_path(params, env.base_dir)
    if gguf is not None:
        if not gguf.is_file():
            raise OpError(f"GGUF file not found: {gguf}")
        if params.gguf_file:
            check_links(gguf.parent, params, [gguf])
        return {"gguf": env.file_digest(gguf)}
    if params.source.startswith(HF_PREFIX):
        repo, sha = resolve_hf(params.source)
        return {"hf": repo, "commit": sha}
    src = _local(params, env.base_dir)
    if not src.is_dir():
        raise OpError(f"model directory not found: {src}")
    check_links(src, params)
    files = _local_files(src)
    if not any(f.suffix == ".safetensors" for f in files):
        raise OpError(_no_safetensors(src))
    return {"files": {f.name: env.file_digest(f) for f in files}}


def _no_safetensors(src: Path) -> str:
    pickled = sorted(p.name for p in src.glob("*") if p.suffix in PICKLE_SUFFIXES)
    hint = (f" (found {', '.join(pickled)}: pickle checkpoints are never loaded; convert them to "
            "safetensors)") if pickled else ""
    return f"no safetensors weights in {src}{hint}"


# -- running ------------------------------------------------------------------

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model", "vocab.json")


def _needs_instantiation(src: Path, task: str) -> bool:
    import json

    if task == "auto":
        return False
    try:
        archs = json.loads((src / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError):
        return True
    return not any(a.endswith(TASK_SUFFIX[task]) for a in archs)


def _auto_class(task: str, config):
    import transformers

    if task == "sequence-classification":
        return transformers.AutoModelForSequenceClassification
    if task == "causal-lm":
        return transformers.AutoModelForCausalLM
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return transformers.AutoModelForSequenceClassification
    if any(a.endswith("ForCausalLM") for a in archs) or getattr(config, "is_decoder", False):
        return transformers.AutoModelForCausalLM
    try:
        transformers.AutoModelForCausalLM._model_mapping[type(config)]
        return transformers.AutoModelForCausalLM
    except KeyError:
        return transformers.AutoModel


def _why(exc: Exception) -> str:
    first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _build_error(what: str, src: Path, exc: Exception, params: LoadParams) -> OpError:
    if "custom code" in str(exc) and not params.trust_remote_code:
        return OpError(f"{what} from {src} needs the directory's own Python code (an auto_map in its "
                       "config); weightflow never runs it unless the load step sets trust_remote_code: true")
    return OpError(f"cannot build {what} from {src} ({_why(exc)})")


def _record(ctx, report: dict, seed: int) -> None:
    """Which tensors were initialised (and from which seed) and which were dropped: manifest only."""
    if report.get("initialised"):
        ctx.info["initialised"] = {"tensors": report["initialised"], "seed": seed}
    if report.get("dropped"):
        ctx.info["dropped"] = report["dropped"]


def _instantiate(params: LoadParams, ctx, src: Path | None, gguf: Path | None, tmp: Path) -> Path:
    """Build the model with transformers and save it (safetensors) into ``tmp``."""
    from weightflow.ops.lib.models import quiet_transformers

    with quiet_transformers():  # "newly initialized head" is expected here
        return _build(params, ctx, src, gguf, tmp)


def _build(params: LoadParams, ctx, src: Path | None, gguf: Path | None, tmp: Path) -> Path:
    import torch
    import transformers

    from weightflow.ops.lib.models import check_loaded
    from weightflow.ops.lib.tensors import Checkpoint

    torch.manual_seed(params.init_seed)
    trust = params.trust_remote_code
    extra = {}
    if params.num_labels is not None:
        extra["num_labels"] = params.num_labels
    if params.labels is not None:
        extra.pop("num_labels", None)  # implied by id2label (transformers rejects a mismatch)
        extra["id2label"] = dict(enumerate(params.labels))
        extra["label2id"] = {name: i for i, name in enumerate(params.labels)}
    if params.config is not None:
        cfg = dict(params.config)
        model_type = cfg.pop("model_type")
        try:
            config = transformers.AutoConfig.for_model(model_type, **cfg, **extra)
        except (ValueError, TypeError, KeyError) as exc:
            raise OpError(f"invalid model config: {exc}") from None
        cls = _auto_class(params.task, config)
        model = cls.from_config(config, trust_remote_code=trust)
        ctx.info["initialised"] = {"tensors": "all", "seed": params.init_seed}
    elif gguf is not None:
        import importlib.util

        missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
        if missing:
            raise OpError(f"loading GGUF files needs {' and '.join(missing)}: "
                          f"pip install 'weightflow[gguf]' (or pip install {' '.join(missing)})")
        config = transformers.AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=trust,
                                                         **extra)
        cls = _auto_class(params.task, config)
        loaded, info = cls.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                           trust_remote_code=trust, output_loading_info=True, **extra)
        _record(ctx, check_loaded(loaded, info, None, f"GGUF file {gguf}", new_head=True, check_unexpected=False),
                params.init_seed)
        # save_pretrained refuses GGUF-loaded models: rebuild from a clean config.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        model = cls.from_config(config, trust_remote_code=trust)
        model.load_state_dict(loaded.state_dict(), strict=False)
        try:
            tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=trust)
            tok.save_pretrained(tmp)
        except Exception as exc:  # a GGUF without a usable tokenizer is still a model
            ctx.warn(f"no tokenizer taken from {gguf.name}: {exc}")
        del loaded
    else:
        what = "a sequence-classification model" if params.task == "sequence-classification" else \
            "a causal LM" if params.task == "causal-lm" else "the model"
        try:
            cls = _auto_class(params.task, transformers.AutoConfig.from_pretrained(src, trust_remote_code=trust))
            # ignore_mismatched_sizes: a wrongly shaped tensor is reported below, by name and file
            model, info = cls.from_pretrained(src, use_safetensors=True, trust_remote_code=trust,
                                              dtype=torch.float32, output_loading_info=True,
                                              ignore_mismatched_sizes=True, **extra)
        except Exception as exc:
            raise _build_error(what, src, exc, params) from None
        ckpt = Checkpoint(src, label=f"model directory {src}")
        try:
            _record(ctx, check_loaded(model, info, ckpt, ckpt.label, new_head=True, compare_values=True),
                    params.init_seed)
        finally:
            ckpt.close()
        try:
            transformers.AutoTokenizer.from_pretrained(src, trust_remote_code=trust).save_pretrained(tmp)
        except Exception as exc:
            if any((src / f).is_file() for f in TOKENIZER_FILES):
                why = ("it needs the directory's own Python code, which runs only with trust_remote_code: true"
                       if "custom code" in str(exc) else _why(exc))
                ctx.warn(f"the tokenizer of {src} is not taken along: {why}")
    model.save_pretrained(tmp, safe_serialization=True)
    return tmp


def check_architecture(src: Path, params: LoadParams, ctx) -> None:
    """A directory imported as it is must still fit the architecture its config names: build
    that model on the meta device (no weights in memory) from the files and check that every
    tensor of it comes from them, with its shape and kind of dtype.  Directories whose
    architecture is not a transformers class (custom code, plain tensors) are not checked."""
    import json

    import torch
    import transformers

    from weightflow.ops.lib.models import check_loaded, quiet_transformers
    from weightflow.ops.lib.tensors import Checkpoint

    try:
        archs = json.loads((src / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return
    cls = getattr(transformers, archs[0], None) if archs and isinstance(archs[0], str) else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        return
    try:
        with quiet_transformers():
            model, info = cls.from_pretrained(src, device_map="meta", use_safetensors=True,
                                              trust_remote_code=params.trust_remote_code, dtype=torch.float32,
                                              output_loading_info=True, ignore_mismatched_sizes=True)
    except Exception as exc:  # transformers cannot build it at all: imported as before, said so
        ctx.warn(f"the tensors of {src} were not checked against {archs[0]} ({_why(exc)})")
        return
    ckpt = Checkpoint(src, label=f"model directory {src}")
    try:
        check_loaded(model, info, ckpt, ckpt.label, new_head=False)
    finally:
        ckpt.close()


def import_directory(src: Path, ctx, dtype: str) -> dict:
    """Stream a model directory's tensors into ``ctx.out``, cast to ``dtype``."""
    from weightflow.ops.lib.tensors import Checkpoint

    ckpt = Checkpoint(src, label=f"model directory {src}")
    try:
        return write_model(ckpt.info, ckpt.get, src, ctx, dtype, "import")
    finally:
        ckpt.close()


def write_model(tensors: dict, read, side: Path, ctx, dtype: str, desc: str) -> dict:
    """Write a model into ``ctx.out``: ``tensors`` (name -> TensorInfo, in file order), each read
    row chunk by row chunk with ``read(name, lo, hi)``, float tensors cast to ``dtype``; then the
    config/tokenizer files of the directory ``side``.  ``import_directory`` reads a directory's
    files; ``models.save_model`` a model in memory (the same bytes for the same tensors)."""
    import json

    from weightflow.ops.lib.tensors import (
        FLOAT_ST,
        TORCH_DTYPES,
        TensorInfo,
        copy_side_files,
        row_ranges,
        st_dtype_of,
        tensor_buffer,
    )

    target = st_dtype_of(dtype)
    plan = [TensorInfo(n, target if i.dtype in FLOAT_ST else i.dtype, i.shape) for n, i in tensors.items()]
    writer = ctx.tensor_writer(plan)
    params = 0
    with ctx.progress(len(plan), desc) as bar:
        for info in plan:
            for lo, hi in row_ranges(info.shape):
                t = read(info.name, lo, hi)
                if info.dtype != tensors[info.name].dtype:
                    t = t.to(TORCH_DTYPES[dtype])
                writer.append(info.name, tensor_buffer(t))
                params += t.numel()
            bar.update(1)
    writer.close()
    if not (side / "config.json").is_file():
        raise OpError(f"{side} has no config.json; it is not a Hugging Face model directory")
    copy_side_files(side, ctx.out, dtype=dtype)
    cfg = json.loads((ctx.out / "config.json").read_text())
    return {"parameters": params, "dtype": dtype, "architectures": cfg.get("architectures") or [],
            "model_type": cfg.get("model_type")}


def run(inputs, params: LoadParams, ctx) -> dict:
    import tempfile

    from weightflow.ops.lib.tensors import Checkpoint

    dtype = params.dtype or ctx.dtype
    gguf = _gguf_path(params, ctx.pipeline_dir)
    src: Path | None = None
    source_desc: dict[str, Any]
    if params.config is not None:
        source_desc = {"config": params.config, "init_seed": params.init_seed}
    elif gguf is not None:
        if params.gguf_file:
            check_links(gguf.parent, params, [gguf])
        source_desc = {"gguf": gguf.name}
    elif params.source.startswith(HF_PREFIX):
        repo, sha = resolve_hf(params.source)
        from huggingface_hub import snapshot_download

        patterns = ["*.safetensors", "*.safetensors.index.json", *SIDE_FILE_GLOBS]
        try:  # a pinned commit already in the local HF cache needs no network
            src = Path(snapshot_download(repo, revision=sha, allow_patterns=patterns, local_files_only=True))
        except Exception:
            src = None
        if src is None:
            try:
                from huggingface_hub import HfApi

                HfApi().model_info(repo, revision=sha, timeout=15)  # fails fast, without retries
                src = Path(snapshot_download(repo, revision=sha, allow_patterns=patterns))
            except Exception as exc:
                first = str(exc).splitlines()[0][:200] if str(exc) else ""
                raise OpError(f"cannot download hf:{repo}@{sha} ({type(exc).__name__}: {first}); the hub "
                              "is unreachable and the commit is not in the local HF cache") from None
        if not list(src.glob("*.safetensors")):
            raise OpError(f"hf:{repo}@{sha} has no safetensors weights; pickle checkpoints are never loaded")
        source_desc = {"hf": repo, "commit": sha}
    else:
        src = _local(params, ctx.pipeline_dir)
        if not list(src.glob("*.safetensors")):
            raise OpError(_no_safetensors(src))
        source_desc = {"directory": src.name}
    if src is not None:
        check_links(src, params)
        Checkpoint(src, label=f"model directory {src}").close()  # headers checked before anything else

    if params.config is not None or gguf is not None or _needs_instantiation(src, params.task):
        with tempfile.TemporaryDirectory(dir=ctx.out.parent) as tmp:
            built = _instantiate(params, ctx, src, gguf, Path(tmp))
            meta = import_directory(built, ctx, dtype)
    else:
        check_architecture(src, params, ctx)
        meta = import_directory(src, ctx, dtype)
    ctx.info["source"] = source_desc  # manifest only: where it came from is not content
    return meta


OP = OpSpec[LoadParams](
    name="load",
    version=1,
    output=Kind.MODEL,
    params=LoadParams,
    run=run,
    doc=__doc__,
    fingerprint=fingerprint,
    # follow_symlinks only allows or refuses reading: the files' digests (the fingerprint) are
    # what the output depends on, and existing keys (lock files) stay as they were.
    key_exclude=("source", "follow_symlinks"),
)
