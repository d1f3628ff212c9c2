"""weightflow: declarative model surgery.

The installed package ``weightflow`` is assembled from the repository's top-level
folders: ``dsl/`` becomes ``weightflow.dsl`` (the language, graph, executor, store and
CLI) and ``ops/`` becomes ``weightflow.ops`` (one module per operation).  This tiny
folder only holds the package root, so ``python -m weightflow`` works.
"""

# The one version source: pyproject.toml reads it ([tool.setuptools.dynamic]); anything that
# reports the version uses this or importlib.metadata.version("weightflow").
__version__ = "0.1.0"
