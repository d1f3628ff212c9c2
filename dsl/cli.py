"""The ``weightflow`` command line.

Verbs follow how people think about pipelines (DVC's ``repro``/``status``/``dag``):
``validate``, ``plan``, ``run``, ``dag``, ``status``, ``show``, ``export``, ``report``,
``gc``, ``schema``, ``ops``.  Commands that run no model never import torch.  User errors
print ``FILE:LINE:COL: step 'NAME': message`` lines and exit with status 2, never a
traceback; a failed step exits with status 1 and keeps every finished cache entry.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

from weightflow.dsl.lang.diagnostics import (
    PipelineError,
    StepFailed,
    WeightflowError,
    did_you_mean,
)


def _err(msg: str) -> None:
    print(msg, file=sys.stderr)


def _var_overrides(items: list[str] | None) -> dict:
    """``--var NAME=VALUE`` items as {NAME: value}; VALUE is YAML, read with the limits of
    pipeline files (an alias bomb is refused, not expanded); text that is not YAML stays
    a string.  Whether NAME is a variable of the pipeline is checked when it is loaded."""
    from weightflow.dsl.lang.yamlsource import load_value

    out = {}
    for item in items or ():
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise WeightflowError(f"--var expects NAME=VALUE, got {item!r}")
        out[name] = load_value(value, f"--var {name}") if value else ""
    return out


def _positive_int(text: str) -> int:
    """argparse type for --jobs: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def _load(path: str, args=None):
    from weightflow.dsl.lang.pipeline import load_pipeline

    p = load_pipeline(path, _var_overrides(getattr(args, "var", None)))
    for w in p.warnings:
        _err(w.format())
    _relocate(p, getattr(args, "out_dir", None), getattr(args, "lock", None))
    if args is not None:
        args.loaded_pipeline = p  # its `store: {remote: URL}` is read by _store
    return p


def _relocate(p, out_dir: str | None, lock: str | None) -> None:
    """Apply ``--out DIR`` / ``--lock FILE``: a ready-made pipeline run from a library
    checkout (with ``--var``) must not write ``out/`` and a lock file into that checkout.

    ``--out DIR``: outputs written as relative paths resolve under DIR (absolute ones stay),
    and the lock file is DIR/<pipeline stem>.lock; ``--lock FILE`` names the lock file
    itself (it wins over --out's).  ``--frozen``, ``plan`` and ``status`` read the same place.
    """
    if out_dir:
        root = Path(out_dir).expanduser().absolute()
        p.outputs = {name: root / p.relative_outputs[name] if name in p.relative_outputs else target
                     for name, target in p.outputs.items()}
        p.lock_file = root / p.path.with_suffix(".lock").name
    if lock:
        p.lock_file = Path(lock).expanduser().absolute()


def _place_args(sp) -> None:
    """``--out DIR`` and ``--lock FILE`` (see ``_relocate``) for the commands that read the lock."""
    sp.add_argument("--out", dest="out_dir", metavar="DIR",
                    help="resolve relative `outputs:` under DIR and keep the lock file there as "
                    "DIR/<pipeline>.lock (default: beside the pipeline)")
    sp.add_argument("--lock", metavar="FILE", help="the lock file to read and write (default: "
                    "<pipeline>.lock beside the pipeline, or in --out DIR)")


def _remote_url(args) -> str | None:
    """The remote store: ``--remote URL``, else ``$WEIGHTFLOW_REMOTE``, else the loaded
    pipeline's ``store: {remote: URL}``; None for a local store only."""
    from weightflow.dsl.store.remote import REMOTE_ENV

    given = getattr(args, "remote", None)
    if isinstance(given, str) and given:
        return given
    if os.environ.get(REMOTE_ENV):
        return os.environ[REMOTE_ENV]
    return getattr(getattr(args, "loaded_pipeline", None), "store_remote", None)


def _store(args):
    from weightflow.dsl.store.content import Store

    # these look up many steps but need few objects: a remote object is fetched on first use
    lazy = getattr(args, "command", None) in ("plan", "status", "run", "show", "export")
    return Store(getattr(args, "cache_dir", None) or None, remote=_remote_url(args), lazy_fetch=lazy)


def _check_steps(pipeline, names, what: str) -> None:
    for n in names or ():
        if n not in pipeline.steps:
            raise WeightflowError(f"{what} '{n}' is not a step of {pipeline.path.name}"
                                  f"{did_you_mean(n, pipeline.steps)}; steps: {', '.join(pipeline.steps)}")


def _print_table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    print(fmt.format(*header).rstrip())
    for r in rows:
        print(fmt.format(*map(str, r)).rstrip())


def _steps_json(pipeline, statuses) -> dict:
    steps = [{**s.as_json(), **_family_fields(pipeline, s.name)} for s in statuses]
    doc: dict[str, object] = {"pipeline": str(pipeline.path), "steps": steps}
    if pipeline.families:
        doc["families"] = {f: [m.name for m in members] for f, members in pipeline.families.items()}
    return doc


# -- families (sweeps): one row for all members unless --expand -------------------

def _family_fields(pipeline, name: str) -> dict:
    """``family`` and ``matrix`` (the member's values) for a member's JSON entry, else {}."""
    step = pipeline.steps.get(name)
    if step is None or not step.family:
        return {}
    return {"family": step.family, "matrix": step.matrix}


def _counted(values: list[str]) -> str:
    """'4 cached, 2 to run': how many times each value occurs, in first-seen order ('-' and
    empty values are not counted)."""
    counts: dict[str, int] = {}
    for v in values:
        if v not in ("", "-"):
            counts[v] = counts.get(v, 0) + 1
    return ", ".join(f"{n} {v}" for v, n in counts.items()) or "-"


def _fold_families(pipeline, names: list[str], rows: list[list[str]], counted: dict[int, dict[str, str]],
                   expand: bool, blank: tuple[int, ...] = ()) -> tuple[list[list[str]], list[str]]:
    """``rows`` (one per step in ``names``) with each family's members folded into one row,
    at its first member: ``merged@* (6 members)``, the columns in ``counted`` as counts of
    their values (each value renamed through its mapping, e.g. pending -> to run), those in
    ``blank`` (keys, digests) as '-', the others as their distinct values.  ``expand``: the
    members' rows follow, indented.  Also returns one summary line per family
    (``merged@* (6 members): 2 cached, 4 to run``)."""
    by_family: dict[str, list[int]] = {}
    for i, n in enumerate(names):
        step = pipeline.steps.get(n)
        if step is not None and step.family:
            by_family.setdefault(step.family, []).append(i)
    out: list[list[str]] = []
    lines: list[str] = []
    for i, (n, row) in enumerate(zip(names, rows, strict=True)):
        step = pipeline.steps.get(n)
        family = step.family if step is not None else None
        if not family:
            out.append(row)
            continue
        members = by_family[family]
        if i != members[0]:
            continue
        label = f"{family}@* ({len(members)} member{'s' if len(members) != 1 else ''})"
        folded = [label]
        summary: list[str] = []
        for c in range(1, len(row)):
            column = [str(rows[j][c]) for j in members]
            if c in counted:
                folded.append(_counted([counted[c].get(v, v) for v in column]))
                summary.append(folded[-1])
            elif c in blank:
                folded.append("-")
            else:
                distinct = [v for v in dict.fromkeys(column) if v not in ("", "-")]
                folded.append("; ".join(distinct) if len(distinct) <= 2 else
                              f"{'; '.join(distinct[:2])}; ...")
        out.append(folded)
        lines.append(f"{label}: {'; '.join(s for s in summary if s != '-')}")
        if expand:
            out.extend(["  " + str(rows[j][0])] + list(rows[j][1:]) for j in members)
    return out, lines


def _compact_names(pipeline, names: list[str]) -> list[str]:
    """``names`` with every family all of whose members are listed written as ``FAMILY@*``."""
    listed = set(names)
    whole = {f for f, members in pipeline.families.items() if all(m.name in listed for m in members)}
    out: list[str] = []
    for n in names:
        step = pipeline.steps.get(n)
        family = step.family if step is not None else None
        if family in whole:
            if f"{family}@*" not in out:
                out.append(f"{family}@*")
        else:
            out.append(n)
    return out


def _reproducible_arg(sp, prefix: str) -> None:
    sp.add_argument("--reproducible", choices=["platform", "strict"], default=None,
                    help=prefix + "override the pipeline's 'reproducible' key: strict pins CPU kernels, "
                    "MKL's path and the thread count so bytes do not depend on the machine (slower); "
                    "platform lets torch choose (digests hold for this platform, which the lock file "
                    "records)")


def _expand_arg(sp) -> None:
    sp.add_argument("--expand", action="store_true",
                    help="list every member of a step family (matrix/foreach) instead of one row for it")


# -- commands -------------------------------------------------------------------

def cmd_validate(args) -> int:
    p = _load(args.pipeline, args)
    if args.json:
        print(json.dumps({"pipeline": str(p.path), "valid": True, "steps": list(p.steps),
                          "warnings": [w.as_json() for w in p.warnings]}))
    else:
        print(f"{args.pipeline}: ok ({len(p.steps)} steps)")
    return 0


def cmd_plan(args) -> int:
    from weightflow.dsl.engine.planner import plan

    p = _load(args.pipeline, args)
    args.target, args.force = p.expand_names(args.target), p.expand_names(args.force)  # FAMILY@*
    _check_steps(p, args.target, "--target")
    _check_steps(p, args.force, "--force")
    store = _store(args)
    statuses = plan(p, store, args.target, args.force, warn=lambda m: _err(f"warning: {m}"),
                    mode=args.reproducible)
    # with a remote: where each step's entry is (local, remote only, missing)
    where = {s.name: store.where(s.key) for s in statuses} if store.remote is not None else {}
    if args.json:
        doc = _steps_json(p, statuses)
        if where:
            for step in doc["steps"]:
                step["where"] = where.get(step.get("name"), "missing")
            doc["remote"] = store.remote_display
        print(json.dumps(doc))
        return 0
    rows = [[s.name, s.op, s.status, (s.key or "-")[:12], (s.digest or "-")[:12], s.reason]
            for s in statuses]
    header = ["STEP", "OP", "STATUS", "KEY", "DIGEST", "REASON"]
    if where:
        rows = [r[:3] + [where[s.name]] + r[3:] for r, s in zip(rows, statuses, strict=True)]
        header.insert(3, "WHERE")
    if any(s.drift for s in statuses):  # only where a recomputed digest may differ from the lock
        rows = [r + [s.drift or "-"] for r, s in zip(rows, statuses, strict=True)]
        header.append("MAY DIFFER FROM LOCK")
    counted: dict[int, dict[str, str]] = {2: {"pending": "to run"}, **({3: {}} if where else {})}
    blank = (4, 5) if where else (3, 4)
    rows, family_lines = _fold_families(p, [s.name for s in statuses], rows, counted, args.expand, blank=blank)
    _print_table(rows, header)
    if where:
        print(f"\nremote: {store.remote_display}")
    todo = sum(s.status == "pending" for s in statuses)
    print(f"\n{todo} step(s) to run, {sum(s.status == 'cached' for s in statuses)} cached")
    for line in family_lines:
        print(line)
    return 0


def cmd_run(args) -> int:
    from weightflow.dsl.engine import repro
    from weightflow.dsl.engine.runner import Runner

    p = _load(args.pipeline, args)
    args.target, args.force = p.expand_names(args.target), p.expand_names(args.force)  # FAMILY@*
    _check_steps(p, args.target, "--target")
    _check_steps(p, args.force, "--force")
    mode = args.reproducible or p.reproducible
    repro.apply(mode)  # before anything imports torch: kernels, MKL path and threads are read once
    if not args.quiet and (note := repro.override_warning()):
        _err(f"warning: {note}")
    show = sys.stderr.isatty() and not args.quiet
    store = _store(args)
    run_opts = dict(targets=args.target, force=args.force, frozen=args.frozen,
                    show_progress=show, log=(lambda m: None) if args.quiet else _err,
                    export=not args.no_export, force_export=args.force_export, relock=args.relock,
                    reproducible=mode, allow_platform_drift=args.allow_platform_drift)
    runner: Runner
    if getattr(args, "backend", "local") == "ray":  # imported only here: ray is optional
        from weightflow.dsl.engine.ray_backend import RayRunner

        runner = RayRunner(p, store, address=args.address, jobs=args.jobs, keep_going=args.keep_going,
                           var_overrides=_var_overrides(args.var), **run_opts)
    else:
        if args.address or args.jobs or args.keep_going:
            raise WeightflowError("--address, --jobs and --keep-going apply to --backend ray only")
        runner = Runner(p, store, **run_opts)
    try:
        outcome = runner.run()
    except OSError as exc:
        import errno

        from weightflow.dsl.store.export import disk_full_error

        if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            raise disk_full_error(exc, fallback=store.root) from None
        raise
    if args.json:
        doc = _steps_json(p, outcome.steps)
        doc["lock_changed"] = outcome.lock_changed
        doc["exported"] = outcome.exported
        doc["lock"] = str(p.lock_path)
        print(json.dumps(doc))
    elif not args.quiet:
        executed = sum(s.status == "executed" for s in outcome.steps)
        cached = sum(s.status == "cached" for s in outcome.steps)
        print(f"{executed} executed, {cached} cached"
              + (f"; lock file {p.lock_path if p.lock_file else p.lock_path.name} updated"
                 if outcome.lock_changed else ""))
    return 0


def cmd_dag(args) -> int:
    from weightflow.dsl.lang import graph

    p = _load(args.pipeline, args)
    order = graph.topo_order(p)
    edges = [(e.source, name) for name in order for e in p.steps[name].inputs]
    edges = list(dict.fromkeys(edges))
    if args.mermaid:
        print("flowchart TD")
        for name in order:
            print(f'  {_mermaid_id(name)}["{name}<br/>{p.steps[name].op.name}"]')
        for a, b in edges:
            print(f"  {_mermaid_id(a)} --> {_mermaid_id(b)}")
    elif args.dot:
        print("digraph weightflow {\n  rankdir=TB;")
        for name in order:
            print(f'  "{name}" [label="{name}\\n{p.steps[name].op.name}", shape=box];')
        for a, b in edges:
            print(f'  "{a}" -> "{b}";')
        print("}")
    else:
        shown: set[str] = set()
        for name in order:
            step = p.steps[name]
            srcs = list(dict.fromkeys(e.source for e in step.inputs))
            if not args.expand:
                srcs = list(dict.fromkeys(_compact_names(p, srcs)))
                if step.family and step.family in shown:
                    continue
                if step.family:
                    shown.add(step.family)
                    members = p.families[step.family]
                    name = f"{step.family}@* ({len(members)} members)"
            arrow = f" <- {', '.join(srcs)}" if srcs else ""
            print(f"{name} ({step.op.name}: {step.output.value}){arrow}")
    return 0


def _mermaid_id(name: str) -> str:
    """A mermaid node id for step ``name`` (member names hold '@', '=', ',' and '.')."""
    import re

    return re.sub(r"[^A-Za-z0-9_]", "_", name)


def _lock_and_cache_state(s) -> tuple[str, str]:
    """``status``'s LOCK and CACHE cells for one step of ``locked_steps``."""
    from weightflow.dsl.present.report import CACHED, NOT_LOCKED

    if s.locked is None:
        lock_state = NOT_LOCKED
    elif s.op_changed:
        lock_state = f"locked by op {s.locked.op}"
    else:
        lock_state = "locked"
    if s.entry is not None and s.state == CACHED:  # (CACHED: the entry is there)
        cache = "in store" if s.entry.digest == s.digest else "output differs from lock"
    elif s.state == NOT_LOCKED:
        cache = "-"
    else:
        cache = "missing"
    return lock_state, cache


def cmd_status(args) -> int:
    from weightflow.dsl.engine.planner import drift_note, installed_versions
    from weightflow.dsl.present.report import lock_only_steps, locked_steps

    p = _load(args.pipeline, args)
    store = _store(args)
    steps = locked_steps(p, store, warn=_view_warn)
    has_remote = store.remote is not None
    mode = args.reproducible or p.reproducible
    versions = installed_versions()
    rows = []
    out = []
    for s in steps.values():
        lock_state, cache = _lock_and_cache_state(s)
        drift = ""
        if s.locked is not None and cache != "in store":  # it would be recomputed here
            drift = drift_note(p.steps[s.name], s.locked, mode, versions)
        where = store.where(s.key) if has_remote else None  # local, remote (only) or missing
        rows.append([s.name, s.op, lock_state, cache, *([where] if where else []), (s.key or "-")[:12],
                     (s.digest or "-")[:12], drift])
        out.append({"name": s.name, "op": s.op, "lock": lock_state, "cache": cache,
                    **({"where": where} if where else {}),
                    "key": s.key, "digest": s.digest, **({"drift": drift} if drift else {}),
                    **_family_fields(p, s.name)})
    unlocked = [s.name for s in steps.values() if s.locked is None]
    changed = [s.name for s in steps.values() if s.op_changed]
    gone = lock_only_steps(p)
    notes = []
    if unlocked and len(unlocked) == len(steps):
        notes.append(f"{p.lock_path.name} names no step of this pipeline: run it")
    elif unlocked:
        notes.append(f"not in {p.lock_path.name} (run the pipeline): {', '.join(_compact_names(p, unlocked))}")
    if changed:
        notes.append(f"the pipeline names another op than {p.lock_path.name} for: {', '.join(changed)}")
    if gone:
        notes.append(f"{p.lock_path.name} names steps the pipeline no longer has: {', '.join(gone)}")
    notes.append(f"keys come from {p.lock_path.name}, which may be stale relative to {p.path.name} "
                 f"(an edited recipe or a changed input shows only there); "
                 f"`weightflow plan {p.path.name}` recomputes the keys and says what would run")
    if args.json:
        print(json.dumps({"pipeline": str(p.path), "lock": str(p.lock_path), "steps": out,
                          "not_locked": unlocked, "op_changed": changed, "lock_only": gone}))
    else:
        header = ["STEP", "OP", "LOCK", "CACHE", *(["WHERE"] if has_remote else []), "KEY", "DIGEST",
                  "MAY DIFFER FROM LOCK"]
        if not any(r[-1] for r in rows):  # the column only where a recomputed digest may differ
            rows, header = [r[:-1] for r in rows], header[:-1]
        counted: dict[int, dict[str, str]] = {2: {}, 3: {}, 4: {}} if has_remote else {2: {}, 3: {}}
        blank = (5, 6) if has_remote else (4, 5)
        rows, family_lines = _fold_families(p, [s.name for s in steps.values()], rows, counted,
                                            args.expand, blank=blank)
        if has_remote:
            notes.append(f"remote: {store.remote_display}")
        _print_table(rows, header)
        print()
        for line in family_lines + [f"note: {n}" for n in notes]:
            print(line)
    return 0


def _view_warn(m: str) -> None:
    _err(f"warning: {m}")


def _entry_for(p, store, step: str, verify: bool = True):
    """The store entry the lock file names for ``step`` (``verify``: its content checked
    against its digest, a corrupted one discarded), and the lock's entries.  Reads the
    lock file and the store only: no input is fingerprinted, no key recomputed."""
    from weightflow.dsl.lang import graph
    from weightflow.dsl.present.report import locked_steps
    from weightflow.dsl.store import lockfile

    s = locked_steps(p, store, [step], touch=True, verify=verify, warn=_view_warn)[step]
    rerun = f"run `weightflow run {p.path.name} --target {step}` first"
    if s.locked is None:  # s.state == NOT_LOCKED
        raise WeightflowError(f"step '{step}' has no cached output: it is not in the lock file "
                              f"{p.lock_path.name} (the pipeline has not run it); {rerun}")
    if s.entry is None and not s.corrupted:
        raise WeightflowError(f"step '{step}' has no cached output: {p.lock_path.name} names key "
                              f"{s.locked.key[:12]}, which the store {store.root} does not hold "
                              f"(removed by gc, or another --cache-dir?); {rerun}")
    if s.entry is None:
        raise WeightflowError(f"step '{step}' has no cached output: {s.reason}; {rerun}")
    store.object_path(s.entry.digest)  # a remote entry's object is fetched (and checked) now
    lock = lockfile.read(p.lock_path)
    need = graph.needed(p, [step])
    unlocked = [n for n in p.steps if n in need and n not in lock]
    if s.op_changed:
        _err(f"note: {p.lock_path.name} holds the output of op '{s.locked.op}' for step '{step}', "
             f"but the pipeline now names op '{s.op}': the lock is stale; rerun the pipeline "
             f"(`weightflow plan {p.path.name}` says what would run)")
    elif unlocked:
        _err(f"note: {p.lock_path.name} does not name {', '.join(unlocked)}: it is stale relative to "
             f"{p.path.name}; `weightflow plan {p.path.name}` says what would run")
    return s.entry, lock


#: Version of the cached weights summary (``views/``): bump when ``summarize`` changes.
SUMMARY_VERSION = 1


def _summary(entry, store) -> dict:
    """``show``'s weights summary of a stored object.  Computing it reads every weight (0.8 s
    for a 23M-parameter model), and objects never change, so it is kept beside the store's
    objects (``views/<digest>.json``, removed by ``gc`` with its object) and read back."""
    from weightflow.dsl.present.tensor_stats import summarize
    from weightflow.dsl.store.content import write_atomic

    view = store.root / "views" / entry.digest[:2] / f"{entry.digest}.json"
    with contextlib.suppress(OSError, ValueError):
        cached = json.loads(view.read_text())
        if isinstance(cached, dict) and cached.get("version") == SUMMARY_VERSION:
            return cached["summary"]
    out = summarize(entry.path, entry.kind) if list(entry.path.glob("*.safetensors")) else {}
    with contextlib.suppress(OSError, ValueError):
        out["metadata"] = json.loads((entry.path / "weightflow.json").read_text())
    with contextlib.suppress(OSError, TypeError, ValueError):  # a read-only store still shows
        view.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(view, json.dumps({"version": SUMMARY_VERSION, "summary": out}).encode(), fsync=False)
    return out


def cmd_show(args) -> int:
    p = _load(args.pipeline, args)
    _check_steps(p, [args.step], "step")
    store = _store(args)
    entry, lock = _entry_for(p, store, args.step)

    def lineage(name: str, depth: int = 0) -> dict:
        s = lock.get(name)
        node: dict = {"step": name, "op": p.steps[name].op.name, "key": s.key if s else None,
                      "digest": s.digest if s else None}
        srcs = list(dict.fromkeys(e.source for e in p.steps[name].inputs))
        if srcs and depth < 64:
            node["inputs"] = [lineage(x, depth + 1) for x in srcs]
        return node

    doc = {"step": args.step, "path": str(entry.path), "manifest": entry.manifest,
           "summary": _summary(entry, store), "lineage": lineage(args.step)}
    if args.json:
        print(json.dumps(doc, indent=1))
        return 0
    from weightflow.dsl.present import show
    from weightflow.dsl.present.table import fmt_seconds

    m = entry.manifest
    print(f"step      {args.step} ({m.get('op')} v{m.get('op_version')}) -> {m.get('kind')}")
    print(f"key       {entry.key}\ndigest    {entry.digest}\npath      {entry.path}")
    print(f"created   {m.get('created')}, ran {fmt_seconds(m.get('seconds'))}")
    print(f"versions  {', '.join(f'{k} {v}' for k, v in (m.get('versions') or {}).items())}")
    _print_weights(p, entry, lock, doc["summary"], args.tensors)
    if entry.kind == "Report":
        _print_report(p, store, args.step)
    init = (m.get("info") or {}).get("initialised")
    if isinstance(init, dict):
        tensors = init.get("tensors")
        what = "all tensors" if tensors == "all" else ", ".join(map(str, tensors or []))
        print(f"initialised {what} (seed {init.get('seed')})")
    if (m.get("info") or {}).get("dropped"):
        print(f"dropped   {', '.join(map(str, m['info']['dropped']))}")
    for line in show.info_lines(m.get("info") or {}):
        print(line)
    print("lineage")
    _print_lineage(doc["lineage"])
    return 0


def _print_weights(p, entry, lock, summ: dict, tensors: bool) -> None:
    """`show`'s lines about stored tensors: size, sparsity (per layer for a model), a delta's base."""
    from weightflow.dsl.present import show

    meta = summ.get("metadata") or {}
    if entry.kind == "Stats":  # collect-stats: statistics of a model, not weights
        print(f"stats     {meta.get('stats')} ({summ.get('tensors', 0)} tensors, "
              f"{summ.get('stored_bytes', 0) / 1e6:.2f} MB) over {meta.get('examples')} examples, "
              f"{meta.get('tokens')} tokens, of model {str(meta.get('model') or '-')[:12]}")
    elif "parameters" in summ:
        stored, dense = summ["stored_bytes"], summ["dense_bytes"]
        print(f"weights   {summ['tensors']} tensors, {summ['parameters']:,} parameters, "
              f"{', '.join(summ['dtypes'])}; {stored / 1e6:.2f} MB stored"
              + (f" ({100 * stored / dense:.1f}% of dense)" if dense and stored != dense else ""))
        if summ.get("sparsity") is not None:
            print(f"sparsity  {100 * summ['sparsity']:.2f}% zeros overall")
    if entry.kind == "Model" and summ.get("per_tensor"):
        for line in show.sparsity_lines(summ["per_tensor"]):
            print(line)
    if meta.get("base"):
        names = {st.digest: n for n, st in lock.items() if n in p.steps}
        print(f"base      {meta['base']}" + (f" (step '{names[meta['base']]}')" if meta["base"] in names else ""))
    if summ.get("per_tensor") and (entry.kind == "Delta" or tensors):
        _print_tensors(summ["per_tensor"], meta)


def _print_report(p, store, step: str) -> None:
    """`show`'s view of a Report: the report's wide table, models named as the pipeline now names them."""
    from weightflow.dsl.present import table
    from weightflow.dsl.present.report import collect

    (doc,) = collect(p, store, warn=_view_warn, only=[step])
    if doc["report"] is not None:
        print(table.text(table.build(doc), title="report"))


def _print_tensors(per_tensor: list[dict], meta: dict) -> None:
    """`show`'s per-tensor table (shape, storage, density, L2 and the op's scale or q)."""
    tensors = meta.get("tensors")
    extra = tensors if isinstance(tensors, dict) else {}
    rows = []
    for r in per_tensor:
        e = extra.get(r["name"], {})
        scale = e.get("q", e.get("scale"))
        rows.append([r["name"], "x".join(map(str, r["shape"])), r["storage"],
                     f"{r['density']:.4f}" if "density" in r else "-",
                     f"{r['l2']:.4g}" if "l2" in r else "-",
                     f"{scale:.4g}" if isinstance(scale, (int, float)) else "-"])
    print()
    _print_table(rows, ["TENSOR", "SHAPE", "STORAGE", "DENSITY", "L2", "Q" if "q" in str(extra) else "SCALE"])
    print()


def _print_lineage(node: dict, indent: str = "  ") -> None:
    print(f"{indent}{node['step']} ({node['op']}) {(node['digest'] or '-')[:12]}")
    for child in node.get("inputs", []):
        _print_lineage(child, indent + "  ")


def cmd_export(args) -> int:
    from weightflow.dsl.store.export import export_step, preflight_export, resolve_format

    p = _load(args.pipeline, args)
    _check_steps(p, [args.step], "step")
    store = _store(args)
    entry, _ = _entry_for(p, store, args.step, verify=False)
    resolve_format(args.step, entry.manifest, args.format)  # a format that does not fit fails first
    where = {"store_root": store.root, "pipeline_dir": p.base_dir, "force": args.force}
    preflight_export(args.dir, **where)  # a target it may not replace fails before the re-hash
    if not store.verify(entry, deep=True if p.verify == "always" else None):
        store.discard(entry)  # as `run` would: the next run recomputes it
        raise WeightflowError(f"step '{args.step}' has no cached output: its stored output "
                              f"(object {entry.digest[:12]}) is corrupted, its content no longer "
                              f"matches its digest, and was discarded; run `weightflow run "
                              f"{p.path.name} --target {args.step}` to recompute it")
    if export_step(p, store, args.step, entry.path, entry.manifest, Path(args.dir), fmt=args.format,
                   force=args.force, warn=_view_warn, log=_err):
        print(f"exported {args.step} ({entry.digest[:12]}) -> {args.dir}"
              + (f" as {args.format}" if args.format else ""))
    else:
        print(f"{args.dir} is up to date: it already holds {args.step} ({entry.digest[:12]}), unchanged")
    return 0


def cmd_report(args) -> int:
    from weightflow.dsl.present.report import render

    p = _load(args.pipeline, args)
    done = render(p, _store(args), Path(args.out) if args.out else None, warn=_view_warn)
    if args.json:
        print(json.dumps({"pipeline": str(p.path), "files": done["files"],
                          "reports": done["reports"]}, indent=1))
    else:
        print(done["markdown" if args.md else "text"], end="")
        _err(f"wrote {done['files']['markdown']} and {done['files']['html']}")
    return 0


def cmd_diff(args) -> int:
    from weightflow.dsl.present.diff import cli

    out, code = cli(args, _store(args), _var_overrides(args.var), warn=_view_warn)
    print(out, end="")
    return code


def cmd_gc(args) -> int:
    import math

    from weightflow.dsl.store.verify import lock_scope

    days = args.older_than
    if not math.isfinite(days) or days < 0:
        raise WeightflowError(f"--older-than expects a number of days >= 0, got {days:g}")
    keep_keys = set(lock_scope(args.locks))
    if args.remote is not None:
        return _gc_remote(args, keep_keys, days)
    store = _store(args)
    doc = store.collect(keep_keys, days, dry_run=args.dry_run)
    if args.json:
        print(json.dumps(doc))
        return 0

    def size(n: int) -> str:
        for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
            if n >= scale:
                return f"{n / scale:.1f} {unit}"
        return f"{n} B"

    verb = "would remove" if args.dry_run else "removed"
    def freed(r: dict) -> str:
        if r["bytes"]:
            return size(r["bytes"])
        return "0 (shared)" if r["digest"] and store.object_path(r["digest"]).is_dir() else "-"

    rows = [[r["step"] or "-", r["pipeline"] or "-", freed(r), r["last_used"],
             r["key"][:12] if r["key"] else f"object {r['digest'][:12]}"] for r in doc["removed"]]
    if rows:
        _print_table(rows, ["STEP", "PIPELINE", "SIZE", "LAST USE", "KEY"])
        print()
    def n(count: int, word: str, plural: str = "") -> str:
        return f"{count} {word if count == 1 else plural or word + 's'}"

    print(f"{verb} {n(doc['actions'], 'entry', 'entries')} and "
          f"{n(doc['objects'], 'object')} ({size(doc['bytes'])})"
          + (f" and {n(len(doc['staging']), 'abandoned staging dir')}" if doc["staging"] else "")
          + (f" and {n(doc['scores'], 'cached score')} ({size(doc.get('score_bytes', 0))})"
             if doc.get("scores") else "")
          + f"; kept {n(doc['kept_actions'], 'entry', 'entries')} "
          f"({doc['kept_by_lock']} named by the lock files, the rest used in the last {days:g} days) "
          f"and {n(doc['kept_objects'], 'object')}"
          + (f" and {n(doc['kept_scores'], 'cached score')}" if doc.get("kept_scores") else ""))
    return 0


def cmd_verify(args) -> int:
    from weightflow.dsl.store.content import verify_always_env
    from weightflow.dsl.store.verify import lock_scope, verify_store

    store = _store(args)
    scope = lock_scope(args.pipelines) if args.pipelines else None
    deep = args.deep or verify_always_env()
    if args.remote is not None:
        return _verify_remote(args, store, scope, deep)
    doc = verify_store(store, scope, deep=deep, repair=args.repair)
    if args.json:
        print(json.dumps(doc))
    else:
        for p in doc["problems"]:
            who = f"step '{p['step']}'" if p["step"] else "an unknown step"
            where = f" of {p['pipeline']}" if p["pipeline"] else ""
            obj = f", object {p['digest'][:12]}" if p["digest"] else ""
            print(f"{p['problem']}: {who}{where} (key {p['key'][:12]}{obj}): {p['message']}"
                  + (" -- discarded" if p["repaired"] else ""))
        for m in doc["missing"]:
            _err(f"note: step '{m['step']}' of {m['pipeline']} is not in the store "
                 f"(key {m['key'][:12]})")
        bad = len(doc["problems"])
        fixed = sum(p["repaired"] for p in doc["problems"])
        print(f"checked {doc['checked']} entries ({doc['objects']} objects"
              + (f", {doc['hashed_bytes'] / 1e6:.1f} MB re-hashed" if deep else
                 ", unchanged files trusted; --deep re-hashes every byte") + "): "
              + ("no problems" if not bad else f"{bad} problem{'s' if bad != 1 else ''}"
                 + (f", {fixed} discarded" if args.repair else "; --repair discards them")))
    return 0 if doc["ok"] else 1


# -- the remote store: gc/verify on it, push and pull -----------------------------------

def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _need_remote(args, what: str):
    """The Store of ``args`` with its remote; a clear error when none is configured."""
    store = _store(args)
    if store.remote is None:
        raise WeightflowError(f"{what} needs a remote store: pass --remote URL (s3://bucket/prefix, "
                              "file:///path, ...), set $WEIGHTFLOW_REMOTE, or add `store: {remote: URL}` "
                              "to the pipeline")
    return store


def _gc_remote(args, keep_keys: set[str], days: float) -> int:
    """``gc --remote``: the remote's actions and objects, listed before anything is removed."""
    from weightflow.dsl.store.remote import collect_remote

    store = _need_remote(args, "gc --remote")
    doc = collect_remote(store.remote, keep_keys, days, dry_run=args.dry_run)
    if args.json:
        print(json.dumps(doc))
        return 0
    rows = [[r["step"] or "-", r["pipeline"] or "-", _size(r["bytes"]) if r["bytes"] else "-", r["key"][:12]]
            for r in doc["removed"]]
    if rows:
        _print_table(rows, ["STEP", "PIPELINE", "SIZE", "KEY"])
        print()
    verb = "would remove" if args.dry_run else "removed"
    print(f"{doc['remote']}: {verb} {doc['actions']} entries and {doc['objects']} objects "
          f"({_size(doc['bytes'])}); kept {doc['kept_actions']} entries ({doc['kept_by_lock']} named by "
          f"the lock files, the rest younger than {days:g} days) and {doc['kept_objects']} objects")
    return 0


def _verify_remote(args, store, scope, deep: bool) -> int:
    """``verify --remote``: check the remote's entries (``--deep`` downloads and re-hashes)."""
    from weightflow.dsl.store.remote import verify_remote

    if store.remote is None:
        store = _need_remote(args, "verify --remote")
    if args.repair:
        raise WeightflowError("verify --remote does not --repair; `gc --remote` removes entries, and a "
                              "run recomputes and re-uploads a corrupt object")
    import tempfile

    doc = verify_remote(store.remote, scope, deep, Path(tempfile.mkdtemp(dir=store.root if
                        store.root.is_dir() else None, prefix="verify-remote-")), warn=_view_warn)
    if args.json:
        print(json.dumps(doc))
    else:
        for p in doc["problems"]:
            who = f"step '{p['step']}'" if p["step"] else "an unknown step"
            obj = f", object {p['digest'][:12]}" if p["digest"] else ""
            print(f"{p['problem']}: {who} (key {p['key'][:12]}{obj})"
                  + (f": {p['detail']}" if p.get("detail") else ""))
        for m in doc["missing"]:
            _err(f"note: step '{m['step']}' of {m['pipeline']} is not in the remote (key {m['key'][:12]})")
        bad = len(doc["problems"])
        print(f"{doc['remote']}: checked {doc['checked']} entries ({doc['objects']} objects"
              + (f", {doc['hashed_bytes'] / 1e6:.1f} MB downloaded and re-hashed" if deep else
                 ", sizes checked; --deep downloads and re-hashes") + "): "
              + ("no problems" if not bad else f"{bad} problem{'s' if bad != 1 else ''}"))
    return 0 if doc["ok"] else 1


def _locked_names(p, targets: list[str]) -> tuple[list[str], dict]:
    """The steps of ``p``'s lock file that ``targets`` need (all locked steps without)."""
    from weightflow.dsl.lang import graph
    from weightflow.dsl.store import lockfile

    if not p.lock_path.is_file():
        raise WeightflowError(f"lock file not found: {p.lock_path} (run the pipeline first)")
    lock = lockfile.read(p.lock_path)
    need = graph.needed(p, targets) if targets else set(p.steps)
    return [n for n in p.steps if n in need and n in lock], lock


def _moved_output(args, rows: list[dict], verb: str, store) -> int:
    moved = [r for r in rows if r["moved"]]
    total = sum(r["bytes"] for r in moved)
    if args.json:
        print(json.dumps({"remote": store.remote_display, "steps": rows, "moved": len(moved), "bytes": total}))
        return 0 if all(r["state"] != "missing" for r in rows) else 1
    if rows:
        _print_table([[r["step"], r["state"], _size(r["bytes"]) if r["moved"] else "-", (r["digest"] or "-")[:12]]
                      for r in rows], ["STEP", "STATE", "SIZE", "DIGEST"])
        print()
    print(f"{verb} {len(moved)} entries ({_size(total)}) {'to' if verb == 'pushed' else 'from'} "
          f"{store.remote_display}; {len(rows) - len(moved)} already there or missing")
    return 0 if all(r["state"] != "missing" for r in rows) else 1


def cmd_push(args) -> int:
    """Upload the pipeline's locked entries that the remote does not hold."""
    p = _load(args.pipeline, args)
    store = _need_remote(args, "push")
    names, lock = _locked_names(p, p.expand_names(args.target))
    rows = []
    for name in names:
        e = lock[name]
        entry = store._lookup_local(e.key, warn=_view_warn, touch=False)
        row = {"step": name, "key": e.key, "digest": e.digest, "bytes": 0, "moved": False}
        if entry is None:
            row["state"] = "already there" if store.remote_has(e.key) else "missing"
        elif store.remote_has(e.key) and store.remote.read_marker(entry.digest) is not None:
            row["state"] = "already there"
        else:
            before = store.remote.transfer.upload_bytes
            store.upload(entry)
            row.update(state="pushed", moved=True, bytes=store.remote.transfer.upload_bytes - before)
        rows.append(row)
    return _moved_output(args, rows, "pushed", store)


def cmd_pull(args) -> int:
    """Download the pipeline's locked entries (those ``--target`` needs) the local store lacks."""
    p = _load(args.pipeline, args)
    store = _need_remote(args, "pull")
    targets = p.expand_names(args.target)
    _check_steps(p, targets, "--target")
    names, lock = _locked_names(p, targets)
    rows = []
    for name in names:
        e = lock[name]
        row = {"step": name, "key": e.key, "digest": e.digest, "bytes": 0, "moved": False}
        if store._lookup_local(e.key, touch=False) is not None:
            row["state"] = "already there"
        else:
            before = store.remote.transfer.download_bytes
            got = store.lookup(e.key, warn=_view_warn)
            moved = got is not None
            row.update(state="pulled" if moved else "missing", moved=moved,
                       bytes=store.remote.transfer.download_bytes - before)
        rows.append(row)
    return _moved_output(args, rows, "pulled", store)


def cmd_import(args) -> int:
    """`weightflow import mergekit CONFIG.yml`: a mergekit config as a pipeline (stdout or -o)."""
    from weightflow.dsl.lang.mergekit_import import import_mergekit, written_by_import

    out = Path(args.output) if args.output else None
    if out is not None and out.exists() and not args.force and not written_by_import(out):
        raise WeightflowError(f"{out} exists and was not written by `weightflow import`; refusing to overwrite "
                              "it (pass --force to replace it)")
    result = import_mergekit(args.config, out_path=out, layers=args.layers, layer_prefix=args.layer_prefix,
                             trust_remote_code=args.trust_remote_code, out_dir=args.out_dir)
    for w in result.warnings:
        _err(f"warning: {w}")
    if out is not None:
        out.write_text(result.text, encoding="utf-8")
    if args.json:
        print(json.dumps({"source": args.config, "written": str(out) if out else None,
                          "mergekit_method": result.mergekit_method, "method": result.method,
                          "steps": result.steps, "exact": result.exact, "warnings": result.warnings,
                          "pipeline": result.text}, indent=1))
    elif out is None:
        print(result.text, end="")
    else:
        _err(f"wrote {out} (mergekit {result.mergekit_method} -> merge method {result.method}); "
             f"run it with: weightflow run {out}")
    return 0


def cmd_schema(args) -> int:
    from weightflow.dsl.lang.schema import language_schema

    print(json.dumps(language_schema(), indent=2))
    return 0


def cmd_ops(args) -> int:
    from weightflow.dsl.lang.opdocs import (
        ops_json,
        ops_markdown,
        ops_text,
        with_reference,
    )

    if getattr(args, "language", False):
        from weightflow.dsl.lang.opdocs import language_markdown

        print(language_markdown(), end="")
        return 0
    if args.write:
        target = Path(args.write)
        try:
            old = target.read_text(encoding="utf-8")
            new = with_reference(old)
            from weightflow.dsl.lang.opdocs import with_language

            new = with_language(new)  # "The pipeline file" section too, where it has markers
        except (OSError, ValueError) as exc:
            print(f"error: {target}: {exc}", file=sys.stderr)
            return 2
        if new != old:
            target.write_text(new, encoding="utf-8")
        print(f"{target}: op reference {'updated' if new != old else 'already current'}")
        return 0
    if args.name is not None:
        names = [op["name"] for op in ops_json()]
        if args.name not in names:
            raise WeightflowError(f"no op named '{args.name}'{did_you_mean(args.name, names)}; "
                                  f"ops: {', '.join(names)}")
    if args.json:
        print(json.dumps([op for op in ops_json() if args.name in (None, op["name"])], indent=1))
    elif args.markdown:
        print(ops_markdown(), end="")
    else:
        print(ops_text(args.name), end="")
    return 0


# -- argument parsing -----------------------------------------------------------

def _version() -> str:
    from weightflow import __version__

    return __version__


def _diff_args(sp) -> None:
    """`weightflow diff`'s arguments (its forms and the git driver: see ``present/diff.py``)."""
    from weightflow.dsl.present.diff import HELP

    sp.formatter_class = argparse.RawDescriptionHelpFormatter
    sp.description = HELP
    sp.add_argument("sides", nargs="*", metavar="SIDE",
                    help="P | REV P | REV1 REV2 P | OLD NEW (files, /dev/null or REV:PATH); see above")
    sp.add_argument("--var", action="append", metavar="NAME=VALUE",
                    help="override a pipeline variable on both sides (repeatable; VALUE is YAML)")
    sp.add_argument("--md", action="store_true", help="Markdown (for a pull-request comment)")
    sp.add_argument("--expand", action="store_true", help="list every member of a sweep family")
    sp.add_argument("--exit-code", action="store_true", help="exit 1 when something would run")
    sp.add_argument("--git-driver", action="store_true",
                    help="called by git as diff.<driver>.command with its 7 arguments")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="weightflow", description="Declarative model surgery.")
    ap.add_argument("--version", action="version", version=f"weightflow {_version()}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    def add(name, func, help_, pipeline=True, cache=False, json_=True):
        sp = sub.add_parser(name, help=help_, description=help_)
        if pipeline:
            sp.add_argument("pipeline", help="pipeline YAML file")
            sp.add_argument("--var", action="append", metavar="NAME=VALUE",
                            help="override a pipeline variable (repeatable; VALUE is YAML)")
        if cache:
            sp.add_argument("--cache-dir", help="store directory (default: $WEIGHTFLOW_CACHE or "
                            "~/.cache/weightflow)")
            sp.add_argument("--remote", nargs="?", const="", default=None, metavar="URL",
                            help="the remote store the local one caches: s3://bucket/prefix, "
                            "file:///path, anything fsspec opens (default: $WEIGHTFLOW_REMOTE, then "
                            "the pipeline's `store: {remote: URL}`); gc and verify: act on the remote")
        if json_:
            sp.add_argument("--json", action="store_true", help="print one JSON object")
        sp.set_defaults(func=func)
        return sp

    add("validate", cmd_validate, "check a pipeline file without running anything")
    sp = add("plan", cmd_plan, "show which steps are cached and which would run, and why", cache=True)
    sp.add_argument("--target", action="append", default=[], metavar="STEP")
    sp.add_argument("--force", action="append", default=[], metavar="STEP")
    _expand_arg(sp)
    _reproducible_arg(sp, "plan as `run --reproducible` would run: ")
    _place_args(sp)
    sp = add("run", cmd_run, "run the steps the targets need; reuse cached ones", cache=True)
    sp.add_argument("--target", action="append", default=[], metavar="STEP",
                    help="run only what STEP needs (repeatable; default: every step)")
    sp.add_argument("--force", action="append", default=[], metavar="STEP",
                    help="recompute STEP even if cached (repeatable)")
    sp.add_argument("--frozen", action="store_true",
                    help="fail without running anything if the lock file would change")
    sp.add_argument("--no-export", action="store_true", help="do not write the pipeline's outputs")
    sp.add_argument("--force-export", action="store_true",
                    help="replace an output directory even if its files were changed since weightflow "
                    "exported it (a directory weightflow did not write is never replaced)")
    sp.add_argument("--relock", action="store_true",
                    help="ignore the existing lock file (even an unreadable one) and write a fresh one "
                    "from this run")
    _reproducible_arg(sp, "")
    sp.add_argument("--allow-platform-drift", action="store_true",
                    help="with --frozen: accept a step whose bytes differ from the lock only because the "
                    "lock was made on another platform (warns instead of failing)")
    sp.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    sp.add_argument("--backend", choices=["local", "ray"], default="local",
                    help="local: one step at a time in this process (default); ray: every cache miss "
                    "whose inputs are ready runs as a Ray task, independent steps at once")
    sp.add_argument("--address", metavar="ADDR", default=None,
                    help="with --backend ray: the cluster to join (ray://HOST:PORT, HOST:PORT or auto); "
                    "default: start a local Ray sized to this machine")
    sp.add_argument("--jobs", type=_positive_int, default=None, metavar="N",
                    help="with --backend ray: at most N CPUs' worth of steps at once (local Ray: N CPUs)")
    sp.add_argument("--keep-going", action="store_true",
                    help="with --backend ray: after a step fails, still run every step not downstream of it")
    _place_args(sp)
    sp = add("dag", cmd_dag, "print the step graph", json_=False)
    _expand_arg(sp)
    g = sp.add_mutually_exclusive_group()
    g.add_argument("--mermaid", action="store_true")
    g.add_argument("--dot", action="store_true")
    sp = add("status", cmd_status, "compare the pipeline with its lock file and the store (reads "
             "only; `plan` recomputes keys)", cache=True)
    _expand_arg(sp)
    _reproducible_arg(sp, "say where locked digests may differ for a run in this mode: ")
    _place_args(sp)
    sp.description = (
        "Say, for each step, whether the lock file names it and whether the store holds the "
        "lock's entry.  Reads the lock file and the store only: no input is fingerprinted and "
        "no network is used, so the lock may be stale relative to the pipeline file (an edited "
        "recipe or a changed model shows only when keys are recomputed).  `weightflow plan` is "
        "the command that recomputes keys and says what would run; `weightflow verify` checks "
        "the stored content.")
    sp = add("show", cmd_show, "a step's manifest, summary and lineage (the output its lock entry "
             "names)", cache=True)
    sp.add_argument("step")
    sp.add_argument("--tensors", action="store_true", help="per-tensor table for models too")
    _place_args(sp)
    sp = add("export", cmd_export, "write a step's output as a normal model directory", cache=True,
             json_=False)
    sp.add_argument("step")
    sp.add_argument("dir", help="a new or empty directory, or one a previous export wrote")
    sp.add_argument("--force", action="store_true",
                    help="replace DIR even if its files were changed since weightflow exported it "
                    "(a directory weightflow did not write is never replaced)")
    sp.add_argument("--format", choices=["dense", "bitmask", "peft"], default=None,
                    help="dense (default): plain safetensors with the model's tensor names (a Delta's "
                    "sparse tensors written out in full); bitmask: a Delta in weightflow's compact mask + "
                    "values encoding, as stored; peft: a LoRA-trained model as a PEFT adapter directory "
                    "(adapter_config.json, adapter_model.safetensors).  Every model or delta a step made "
                    "gets a model card README.md (lineage, recipe, scores)")
    sp = add("report", cmd_report, "render every evaluate report of a pipeline as one table per report "
             "(terminal), Markdown and HTML (DAG, bar charts, sweep curves and heat maps)", cache=True)
    sp.add_argument("--out", metavar="DIR", help="where to write PIPELINE.report.md and "
                    ".report.html (default: beside the pipeline)")
    sp.add_argument("--md", action="store_true", help="print the Markdown (for a PR comment) instead of "
                    "the terminal table")
    sp = add("diff", cmd_diff, "what a change to a pipeline does: steps changed, invalidated and to "
             "run, their recorded times, metrics side by side", pipeline=False, cache=True)
    _diff_args(sp)
    sp = add("gc", cmd_gc, "remove store entries unused for --older-than days that no given lock "
             "file names", pipeline=False, cache=True)
    sp.formatter_class = argparse.RawDescriptionHelpFormatter
    sp.description = (
        "Remove store entries that no given lock file names and that no command has used\n"
        "(looked up) in the last --older-than days, the objects only they reference, and\n"
        "staging directories left by killed runs.  The store is shared by all your pipelines,\n"
        "so lock files are optional: they only protect their entries however old they are;\n"
        "an entry another pipeline used recently is kept either way.  Objects referenced by a\n"
        "kept entry are kept.  Every removed entry is listed (step, pipeline, size, last use).")
    sp.add_argument("locks", nargs="*", metavar="LOCK",
                    help="lock files (or their pipelines) whose entries are kept whatever their age")
    sp.add_argument("--older-than", type=float, default=14.0, metavar="DAYS",
                    help="remove only entries unused for this many days (default: 14; 0: every "
                    "entry no lock file names)")
    sp.add_argument("--dry-run", action="store_true", help="list what would be removed; remove nothing")
    sp = add("verify", cmd_verify, "check that store entries still hold what they claim", pipeline=False,
             cache=True)
    sp.formatter_class = argparse.RawDescriptionHelpFormatter
    sp.description = (
        "Check every store entry (or those of the given pipelines' lock files): the action\n"
        "names its key, its object exists, was published by that key and still hashes to its\n"
        "digest.  Each problem names the step and pipeline that made the entry.  Exits 1 while\n"
        "problems remain.\n\n"
        "Trade-off: without --deep an object whose files keep the size, mtime and inode they\n"
        "had when last verified is trusted without re-reading it (fast); corruption that keeps\n"
        "those (bit rot, an in-place rewrite that restores the mtime) needs --deep, which reads\n"
        "every byte.  To re-hash on every use instead, set WEIGHTFLOW_VERIFY=always or put\n"
        "'verify: always' in a pipeline (runs and exports get slower by a full read of each\n"
        "artifact they touch).")
    sp.add_argument("pipelines", nargs="*", metavar="PIPELINE",
                    help="pipelines (or their .lock files) whose entries to check (default: all)")
    sp.add_argument("--deep", action="store_true", help="re-hash every byte, ignoring the memo")
    sp.add_argument("--repair", action="store_true",
                    help="discard what is bad (the entry; for a corrupt object, the object too)")
    for verb, func, what in (("push", cmd_push, "upload a pipeline's locked entries to the remote store"),
                             ("pull", cmd_pull, "download a pipeline's locked entries from the remote store")):
        sp = add(verb, func, what, cache=True)
        sp.add_argument("--target", action="append", default=[], metavar="STEP",
                        help="only the entries STEP needs (repeatable; default: every locked step)")
        _place_args(sp)
    sp = sub.add_parser("import", help="translate another tool's config into a pipeline file",
                        description="translate another tool's config into a pipeline file")
    tools = sp.add_subparsers(dest="tool", metavar="TOOL", required=True)
    sp = tools.add_parser("mergekit", help="a mergekit-yaml merge config", description=(
        "Translate a mergekit merge config (models, parameters with filters and gradients, base_model, "
        "dtype, tokenizer_source, slices) into a weightflow pipeline that produces the same tensors. "
        "What cannot be translated is an error naming the config key."))
    sp.add_argument("config", metavar="CONFIG.yml", help="the mergekit config")
    sp.add_argument("-o", "--output", metavar="PIPELINE.yaml", help="write the pipeline here (default: stdout)")
    sp.add_argument("--force", action="store_true", help="with -o: replace a file `weightflow import` did not write")
    sp.add_argument("--layers", type=_positive_int, metavar="N",
                    help="the number of layers of hub models (gradients and slices need it; local models "
                    "are read)")
    sp.add_argument("--layer-prefix", metavar="PREFIX", help="tensor-name prefix of the layers of hub models "
                    "(default: model.layers.)")
    sp.add_argument("--trust-remote-code", action="store_true",
                    help="set trust_remote_code on every load step (mergekit-yaml's --trust-remote-code)")
    sp.add_argument("--out-dir", metavar="DIR", help="export the merged model to DIR after a run (outputs:)")
    sp.add_argument("--json", action="store_true", help="print one JSON object")
    sp.set_defaults(func=cmd_import)
    add("schema", cmd_schema, "print the JSON Schema of the pipeline language", pipeline=False,
        json_=False)
    sp = add("ops", cmd_ops, "list every op with its parameters, or one op with its documentation",
             pipeline=False)
    sp.add_argument("name", nargs="?", metavar="OP", help="only this op, with its whole documentation")
    sp.add_argument("--markdown", action="store_true", help="the op reference as Markdown")
    sp.add_argument("--language", action="store_true", help="the README's \"The pipeline file\" section "
                    "(example, top-level keys, lora and calibration sub-keys) as Markdown")
    sp.add_argument("--write", metavar="FILE", help="with --markdown: replace the generated block of "
                    "FILE (e.g. README.md) with the current reference")
    return ap


def main(argv: list[str] | None = None) -> int:
    # weightflow never reads stdin: a library's "run the custom code? [y/N]" prompt must not
    # be answerable by `echo y | weightflow run` (it then fails instead of running code)
    if getattr(sys.stdin, "name", None) != os.devnull:
        sys.stdin = open(os.devnull)  # noqa: SIM115 (stays open: it replaces stdin for the process)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except PipelineError as exc:
        for line in exc.lines():
            _err(line)
        n = len(exc.diagnostics)
        _err(f"{n} error{'s' if n != 1 else ''}")
        return exc.exit_code
    except StepFailed as exc:
        _err(f"error: {exc}")
        _err("finished steps stay cached; fix the problem and rerun to resume")
        return 1
    except WeightflowError as exc:
        for line in exc.lines():
            _err(line)
        return exc.exit_code
    except KeyboardInterrupt:
        _err("interrupted; finished steps stay cached")
        return 130
    except BrokenPipeError:
        return 0
    except Exception as exc:  # last resort: still no traceback unless asked for
        if os.environ.get("WEIGHTFLOW_DEBUG"):
            raise
        _err(f"internal error: {type(exc).__name__}: {exc} (set WEIGHTFLOW_DEBUG=1 for the traceback)")
        return 3


if __name__ == "__main__":
    raise SystemExit(main())
