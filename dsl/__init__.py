"""weightflow's torch-free half, in rooms that data walks through one way:

``lang`` (YAML -> validated pipeline -> typed graph) -> ``engine`` (keys, plan, run) ->
ops -> ``store`` (objects, lock file, verify, gc, export) -> ``present`` (reports, views);
``format`` is the bytes on disk that the engine, the store and the ops share.
``cli`` is a thin argparse layer over them.  Nothing here imports torch.
"""
