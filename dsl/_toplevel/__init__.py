"""weightflow: declarative model surgery.

The installed package ``weightflow`` is assembled from the repository's top-level
folders: ``dsl/`` becomes ``weightflow.dsl`` (the language, graph, executor, store and
CLI) and ``ops/`` becomes ``weightflow.ops`` (one module per operation).  This tiny
folder only holds the package root, so ``python -m weightflow`` works.
"""

# The one version source: pyproject.toml reads it ([tool.setuptools.dynamic]); anything that
# reports the version uses this or importlib.metadata.version("weightflow").
__version__ = "0.1.0"


def load_model(path, device: str = "cpu"):
    """A model weightflow stored or exported, as a torch module in eval mode: a plain model
    (its config's transformers class, safetensors only, ``trust_remote_code=False``) or a
    Composite (``composite.json``: a contrast, ensemble or guarded rule over component
    models), built by weightflow's own code; nothing in the directory is executed.  The
    module has ``forward(input_ids, attention_mask) -> .logits`` and greedy ``generate``."""
    from pathlib import Path

    from weightflow.ops.lib.models import load_model as _load

    return _load(Path(path), device)


def load_tokenizer(path):
    """The tokenizer of a stored or exported model (a Composite's primary component's)."""
    from pathlib import Path

    from weightflow.ops.lib.models import load_tokenizer as _load

    return _load(Path(path))
