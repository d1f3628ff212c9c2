"""weightflow's built-in operations: one module per op, each exposing ``OP``.

They register through the ``weightflow.ops`` entry-point group (pyproject.toml), the
same way a third-party package adds its own.  Op modules import torch only inside
their ``run`` functions, so reading specs stays fast.
"""
