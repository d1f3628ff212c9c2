"""The language: YAML source, op specs and their registry, the validated pipeline, the typed
graph, parameter diagnostics, the JSON Schema and the op reference.

Nothing here reads the store or runs a model; ``validate``, ``schema``, ``ops`` and
``dag`` need only this room.
"""
