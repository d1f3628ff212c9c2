"""The engine: step keys, the planner's one walk over the graph, the runner that executes
cache misses, the run context an op receives, and the reproducibility settings.
"""
