"""The weightflow language: parsing, the typed graph, keys, the store, the executor, the CLI.

Data walks one way: YAML (``yamlsource``) -> validated ``Pipeline`` (``pipeline``) ->
typed DAG (``graph``) -> keys and plan (``keys``, ``executor``) -> ops -> ``store`` ->
``lockfile`` and reports.  Nothing here imports torch.
"""
