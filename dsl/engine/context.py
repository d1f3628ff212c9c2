"""Artifacts as ops see them, and the context an op runs in.

An artifact is a directory in the store plus its kind and digest.  A Model directory
is a normal Hugging Face model directory (config, safetensors shards, tokenizer); a
Delta holds ``delta*.safetensors``; a Report holds ``report.json``.  Every artifact
carries ``weightflow.json``: its kind and the op's content metadata (for a Delta,
the digest of the base it was taken against).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from weightflow.dsl.format.checkpoint import ShardedWriter, TensorInfo
from weightflow.dsl.lang.spec import Kind

if TYPE_CHECKING:
    from weightflow.dsl.format.sparse import DeltaWriter
    from weightflow.dsl.store.content import Store

META_FILE = "weightflow.json"


@dataclass
class Artifact:
    kind: Kind
    digest: str
    path: Path
    step: str
    # Per-run in-memory cache (e.g. a loaded model) shared by consumers of this
    # artifact; dropped by the executor after the artifact's last consumer.
    cache: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def meta(self) -> dict:
        if "_meta" not in self.cache:
            try:
                self.cache["_meta"] = json.loads((self.path / META_FILE).read_text())
            except (OSError, ValueError):
                self.cache["_meta"] = {}
        return self.cache["_meta"]

    def release(self) -> None:
        self.cache.clear()


FieldPath = tuple[str | int, ...]


class Inputs(Mapping[str, Any]):
    """The artifacts a step's references name, as its op's ``run(inputs, params, ctx)`` gets them.

    A top-level ref field is an item: ``inputs['model']`` is an ``Artifact``, and a list-valued
    one, ``inputs['models']``, the list of them in list order; a null field is absent.  Every
    ref, top-level or inside a nested params model (an ``evaluate`` metric's ``base``), is
    reachable by its field path in the params (YAML spelling, list items by index):
    ``inputs.at(('metrics', 2, 'delta_norm', 'base'))``, ``inputs.at(('models', 1))``.
    """

    def __init__(self, refs: Mapping[FieldPath, Artifact] | None = None) -> None:
        self._refs: dict[FieldPath, Artifact] = dict(refs or {})
        top: dict[str, Any] = {}
        for path, art in self._refs.items():
            head = path[0]
            if not isinstance(head, str):
                raise TypeError(f"a field path starts with a field name, got {path!r}")
            if len(path) == 1:
                top[head] = art
            elif len(path) == 2 and isinstance(path[1], int):  # an item of a list of refs
                top.setdefault(head, {})[path[1]] = art
        self._top = {k: [v[i] for i in sorted(v)] if isinstance(v, dict) else v for k, v in top.items()}

    def __getitem__(self, name: str) -> Any:
        return self._top[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._top)

    def __len__(self) -> int:
        return len(self._top)

    def at(self, path: FieldPath) -> Artifact:
        """The artifact of the step named at field path ``path``; KeyError if none is."""
        return self._refs[tuple(path)]

    def paths(self) -> dict[FieldPath, Artifact]:
        """Every ref's field path and artifact."""
        return dict(self._refs)

    def __repr__(self) -> str:
        return f"Inputs({self._refs!r})"


class RunContext:
    """What an op's ``run(inputs, params, ctx)`` may use: output dir, writers, logs.

    ``store``, ``platform`` and ``fresh`` are for ops that keep finer-grained results of
    their own in the store (``evaluate``: one score per model and metric): the store, the
    platform class this step's results will be recorded as made on (``repro.platform_class``),
    and whether the step is forced (``run --force``), when nothing kept may be reused.  Without
    a store such an op computes everything.
    """

    def __init__(self, *, step: str, out: Path, seed: int, dtype: str, pipeline_dir: Path,
                 names: dict[str, str], shard_bytes: int, show_progress: bool,
                 warn: Callable[[str], None], log: Callable[[str], None] | None = None,
                 store: Store | None = None, platform: str | None = None, fresh: bool = False):
        self.step = step
        self.store = store
        self.platform = platform
        self.fresh = fresh
        self.out = out
        self.seed = seed
        self.dtype = dtype
        self.pipeline_dir = pipeline_dir
        self.shard_bytes = shard_bytes
        self.show_progress = show_progress
        self.info: dict[str, Any] = {}  # goes to the manifest, not the content
        self._names = names
        self._warn = warn
        self._log = log
        self.writers: list[ShardedWriter | DeltaWriter] = []

    def tensor_writer(self, plan: list[TensorInfo], prefix: str = "model",
                      metadata: dict[str, str] | None = None) -> ShardedWriter:
        w = ShardedWriter(self.out, plan, prefix=prefix, max_shard_bytes=self.shard_bytes,
                          metadata=metadata)
        self.writers.append(w)
        return w

    def delta_writer(self, plan: list[TensorInfo], prefix: str = "delta") -> DeltaWriter:
        """A writer that stores each tensor dense or sparse (mask + values), automatically."""
        from weightflow.dsl.format.sparse import DeltaWriter

        w = DeltaWriter(self.out, plan, prefix=prefix, max_shard_bytes=self.shard_bytes)
        self.writers.append(w)
        return w

    def data_path(self, path: str) -> Path:
        """A data file path from the pipeline, resolved against the pipeline's directory."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else self.pipeline_dir / p

    def file_digest(self, path: Path) -> str:
        """The content digest of a file (memoised in the store, when there is one)."""
        if self.store is not None:
            return self.store.file_digest(Path(path))
        from weightflow.dsl.format.checkpoint import hash_file

        return hash_file(Path(path))

    def progress(self, total: int, desc: str, unit: str = "tensor"):
        """A progress bar on a terminal, a line every few seconds in a log (engine/progress.py)."""
        from weightflow.dsl.engine.progress import Bar

        return Bar(self, total, desc, unit, show=self.show_progress)

    def warn(self, message: str) -> None:
        self._warn(f"step '{self.step}': {message}")

    def log(self, message: str) -> None:
        """Show a result to the user (e.g. evaluate's table); silenced by ``run --quiet``."""
        if self._log is not None:
            self._log(message)

    def name_of(self, digest: str) -> str:
        """A readable name for an artifact digest: its step name in this run, if any."""
        name = self._names.get(digest)
        return f"'{name}' ({digest[:12]})" if name else digest[:12]
