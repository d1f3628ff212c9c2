"""What a new user tripped on (issue 13): progress lines where no bar is drawn, op tables
that render, `run --out`/`--lock`, `--frozen` saying what changed, extract-delta's head
check before anything runs, YAML errors in plain words, and the pipeline-file section."""

from __future__ import annotations

import json
import re
import shutil
import textwrap
from pathlib import Path

import pytest
import yaml
from conftest import perturbed_copy, save_tiny_llama, write_pipeline

from weightflow.dsl.cli import main
from weightflow.dsl.lang.diagnostics import PipelineError
from weightflow.dsl.lang.pipeline import parse_text


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """Run the CLI in-process; stderr is captured, i.e. not a terminal (as under make/CI)."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


# -- 1. progress lines when stderr is not a terminal --------------------------------------

class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeCtx:
    def __init__(self, show_progress: bool) -> None:
        self.step = "ft"
        self.show_progress = show_progress
        self.lines: list[str] = []

    def log(self, message: str) -> None:
        self.lines.append(message)


def test_progress_lines_come_every_interval_with_percent_eta_and_loss():
    from weightflow.ops.lib.training import ProgressLines

    clock, ctx = FakeClock(), FakeCtx(show_progress=False)
    lines = ProgressLines(ctx, total=100, what="train step", interval=15, clock=clock)
    for step in range(1, 101):
        clock.now += 1.0  # one second a step
        lines.update(step, loss=2.5 - step / 100, lr=0.001)
    # 100 s of training, a line every 15 s: at 15, 30, ..., 90 s
    assert len(ctx.lines) == 6
    assert ctx.lines[0] == "ft: train step 15/100 (15%), 15s elapsed, ETA 1m25s, loss 2.35, lr 0.001"
    assert ctx.lines[-1].startswith("ft: train step 90/100 (90%), 1m30s elapsed, ETA 10s")


def test_no_progress_lines_when_the_bar_is_drawn():
    from weightflow.ops.lib.training import ProgressLines

    clock, ctx = FakeClock(), FakeCtx(show_progress=True)
    lines = ProgressLines(ctx, total=3, what="train step", interval=0, clock=clock)
    for step in range(1, 4):
        clock.now += 60
        lines.update(step, loss=1.0)
    assert ctx.lines == []


@pytest.mark.parametrize(("value", "expected"), [("", 15.0), ("2.5", 2.5), ("0", 0.0), ("soon", 15.0),
                                                 ("-1", 15.0), ("nan", 15.0)])
def test_progress_interval_from_the_environment(monkeypatch, value, expected):
    from weightflow.ops.lib.training import PROGRESS_INTERVAL_ENV, progress_interval

    monkeypatch.setenv(PROGRESS_INTERVAL_ENV, value)
    assert progress_interval() == expected


@pytest.fixture(scope="module")
def word_llama(tmp_path_factory) -> Path:
    from test_training import save_word_tokenizer

    path = save_tiny_llama(tmp_path_factory.mktemp("newcomer") / "llama", seed=0)
    save_word_tokenizer(path, "llama")
    return path


def test_a_fine_tune_piped_to_a_log_prints_progress_lines(tmp_path, store_dir, capsys, monkeypatch, word_llama):
    monkeypatch.setenv("WEIGHTFLOW_PROGRESS_INTERVAL", "0")  # a line every step
    (tmp_path / "train.txt").write_text("the cat sat on the mat\nthe dog ran on the log\n" * 4)
    path = write_pipeline(tmp_path, f"""
        weightflow: 1
        steps:
          base: {{op: load, source: {word_llama}}}
          ft: {{op: finetune, model: base, data: train.txt, max_steps: 3, batch_size: 2}}
        """)
    code, _, err = cli(capsys, "run", path, "--cache-dir", store_dir, "--no-export")
    assert code == 0, err
    progress = [ln for ln in err.splitlines() if ln.startswith("ft: train step")]
    assert [ln.split(",")[0] for ln in progress] == ["ft: train step 1/3 (33%)", "ft: train step 2/3 (67%)",
                                                     "ft: train step 3/3 (100%)"]
    assert "ETA" in progress[0] and re.search(r"loss \d", progress[0]), progress[0]
    # --quiet: no progress output at all
    code, _, err = cli(capsys, "run", path, "--cache-dir", store_dir, "--no-export", "--quiet",
                       "--force", "ft")
    assert code == 0 and "train step" not in err, err


# -- 2. op tables that render on GitHub ---------------------------------------------------

def _cells(row: str) -> list[str]:
    """A Markdown table row split as GitHub splits it: on '|' not preceded by a backslash."""
    assert row.startswith("|") and row.endswith("|"), row
    return re.split(r"(?<!\\)\|", row[1:-1])


def test_every_generated_table_row_has_as_many_cells_as_its_header():
    from weightflow.dsl.lang.opdocs import language_markdown, ops_markdown

    for text in (ops_markdown(), language_markdown()):
        width = None
        rows = 0
        for line in text.splitlines():
            if not line.startswith("|"):
                width = None
                continue
            if width is None:
                width = len(_cells(line))  # a header row starts each table
                continue
            assert len(_cells(line)) == width, line
            rows += 1
        assert rows > 10
    # the unions that used to break the finetune table are escaped
    assert "| 'linear' \\| 'cosine' \\| 'constant' |" in ops_markdown()


def test_md_cell_escapes_pipes_and_newlines_once():
    from weightflow.dsl.lang.opdocs import md_cell, md_row

    assert md_cell("'a' | 'b'") == "'a' \\| 'b'"
    assert md_cell(md_cell("a | b")) == "a \\| b"  # not escaped twice
    assert md_cell("one\ntwo") == "one<br>two"
    assert len(_cells(md_row(["x|y", "z"]))) == 2


# -- 3. run --out DIR / --lock FILE --------------------------------------------------------

@pytest.fixture
def library(tmp_path, tiny_models) -> Path:
    """A read-only-minded 'checkout' holding a ready-made pipeline with relative outputs."""
    lib = tmp_path / "library"
    lib.mkdir()
    write_pipeline(lib, f"""
        weightflow: 1
        vars: {{model: {tiny_models['base']}}}
        steps:
          base: {{op: load, source: "${{vars.model}}"}}
          ft: {{op: load, source: {tiny_models['ft_a']}}}
          delta: {{op: extract-delta, model: ft, base: base}}
        outputs:
          base: out/base
          ft: {tmp_path / 'absolute-ft'}
        """, name="recipe.yaml")
    return lib


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_run_out_writes_outputs_and_lock_under_dir_and_nothing_into_the_checkout(
        tmp_path, store_dir, library, tiny_models, capsys):
    before = _tree(library)
    work = tmp_path / "work"
    pipeline = library / "recipe.yaml"
    code, out, err = cli(capsys, "run", pipeline, "--out", work, "--cache-dir", store_dir,
                         "--var", f"model={tiny_models['base']}")
    assert code == 0, err
    assert _tree(library) == before  # no out/, no recipe.lock in the checkout
    assert (work / "recipe.lock").is_file() and (work / "out" / "base" / "config.json").is_file()
    assert (tmp_path / "absolute-ft" / "config.json").is_file()  # an absolute output stays put
    assert str(work / "recipe.lock") in out
    lock = (work / "recipe.lock").read_text()
    # --frozen, plan and status read the same lock
    code, _, err = cli(capsys, "run", pipeline, "--out", work, "--cache-dir", store_dir, "--frozen")
    assert code == 0, err
    code, out, _ = cli(capsys, "plan", pipeline, "--out", work, "--cache-dir", store_dir, "--json")
    assert code == 0 and {s["status"] for s in json.loads(out)["steps"]} == {"cached"}
    code, out, _ = cli(capsys, "status", pipeline, "--out", work, "--cache-dir", store_dir, "--json")
    doc = json.loads(out)
    assert doc["lock"] == str(work / "recipe.lock") and doc["not_locked"] == []
    # without --out, status finds no lock beside the pipeline: nothing is locked there
    code, out, _ = cli(capsys, "status", pipeline, "--cache-dir", store_dir, "--json")
    assert sorted(json.loads(out)["not_locked"]) == ["base", "delta", "ft"]
    assert (work / "recipe.lock").read_text() == lock


def test_run_lock_places_the_lock_file_explicitly(tmp_path, store_dir, library, capsys):
    before = _tree(library)
    lock = tmp_path / "locks" / "mine.lock"
    pipeline = library / "recipe.yaml"
    code, _, err = cli(capsys, "run", pipeline, "--lock", lock, "--no-export", "--cache-dir", store_dir)
    assert code == 0, err
    assert _tree(library) == before
    assert set(yaml.safe_load(lock.read_text())["steps"]) == {"base", "ft", "delta"}
    # --lock wins over --out's lock, and --frozen reads it
    code, _, err = cli(capsys, "run", pipeline, "--lock", lock, "--out", tmp_path / "w", "--frozen",
                       "--no-export", "--cache-dir", store_dir)
    assert code == 0, err
    assert not (tmp_path / "w" / "recipe.lock").exists()


# -- 4. --frozen says what changed ---------------------------------------------------------

def test_frozen_names_the_changed_input_and_the_param(tmp_path, store_dir, tiny_models, capsys):
    ft_dir = perturbed_copy(tiny_models["base"], tmp_path / "ftdir", seed=5)
    text = f"""
        weightflow: 1
        steps:
          base: {{op: load, source: {tiny_models['base']}}}
          ft: {{op: load, source: {ft_dir}}}
          delta: {{op: extract-delta, model: ft, base: base{{extra}}}}
        """
    path = write_pipeline(tmp_path, text.replace("{extra}", ""))
    code, _, err = cli(capsys, "run", path, "--cache-dir", store_dir)
    assert code == 0, err
    # the fine-tune's weights change on disk, and the delta's recipe changes in the file
    shutil.copyfile(tiny_models["ft_b"] / "model.safetensors", ft_dir / "model.safetensors")
    write_pipeline(tmp_path, text.replace("{extra}", ", exclude: ['lm_head.*']"))
    code, _, err = cli(capsys, "run", path, "--cache-dir", store_dir, "--frozen")
    assert code == 1
    assert "an input is not locked" not in err
    ft_line = next(ln for ln in err.splitlines() if "step 'ft' would change" in ln)
    assert "external input files.model.safetensors: locked " in ft_line and ", now " in ft_line, ft_line
    delta_line = next(ln for ln in err.splitlines() if "step 'delta'" in ln)
    assert "its input 'ft' would change" in delta_line, delta_line
    # with the weights restored, only the parameter is left to explain
    perturbed_copy(tiny_models["base"], ft_dir, seed=5)
    code, _, err = cli(capsys, "run", path, "--cache-dir", store_dir, "--frozen")
    assert code == 1
    delta_line = next(ln for ln in err.splitlines() if "step 'delta' would change" in ln)
    assert 'parameter exclude: locked [], now ["lm_head.*"]' in delta_line, delta_line
    assert "step 'ft'" not in err


def test_describe_changes_names_inputs_files_and_params():
    from weightflow.dsl.engine.recipe_diff import describe_changes

    old = {"op": "merge", "version": 1, "params": {"base": {"input": "a" * 64}, "data": {"file": "c" * 64},
                                                    "weights": [0.5, 0.5]}}
    new = {"op": "merge", "version": 1, "params": {"base": {"input": "b" * 64}, "data": {"file": "d" * 64},
                                                    "weights": [0.5, 0.7], "density": 0.2}}
    phrases = describe_changes(old, new, {("base",): "ft"}, {("data",): "d.jsonl"})
    assert phrases == [f"input 'ft' (base): locked output {'a' * 12}, now output {'b' * 12}",
                       f"data file d.jsonl (data): locked content {'c' * 12}, now content {'d' * 12}",
                       "parameter weights[1]: locked 0.5, now 0.7",
                       "parameter density added (0.2)"]


# -- 5. extract-delta between a bare base and a classifier: caught in preflight -------------

def _fake_model_dir(path: Path, architecture: str) -> Path:
    """Enough of a model directory for the preflight (config.json + a weights file)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": [architecture]}))
    (path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    return path


HEAD_PIPELINE = """\
weightflow: 1
steps:
  base: {{op: load, source: bert{base_task}}}
  clf: {{op: load, source: bert, task: sequence-classification, num_labels: 2}}
  ft: {{op: finetune, model: clf, data: d.jsonl, max_steps: 1}}
  delta: {{op: extract-delta, model: ft, base: base}}
"""


def test_extract_delta_with_a_bare_base_fails_before_anything_runs(tmp_path, store_dir, capsys):
    _fake_model_dir(tmp_path / "bert", "BertForMaskedLM")
    (tmp_path / "d.jsonl").write_text('{"text": "good", "label": 1}\n{"text": "bad", "label": 0}\n')
    path = tmp_path / "pipeline.yaml"
    path.write_text(HEAD_PIPELINE.format(base_task=""))
    code, _, err = cli(capsys, "run", path, "--cache-dir", store_dir)
    assert code == 2, err
    assert f"{path}:6:3: step 'delta': model 'ft' is a sequence-classification model (step 'clf' loaded " \
           "with task: sequence-classification) but base 'base' is a BertForMaskedLM (step 'base' loaded " \
           "without task:)" in err, err
    assert "add `task: sequence-classification` to step 'base'" in err
    assert "Traceback" not in err and "running" not in err and "[1/4]" not in err  # no step started


def test_extract_delta_preflight_passes_when_both_sides_have_the_same_head(tmp_path):
    from weightflow.dsl.engine.planner import Planner
    from weightflow.dsl.lang import graph
    from weightflow.dsl.lang.pipeline import load_pipeline
    from weightflow.dsl.store.content import Store

    _fake_model_dir(tmp_path / "bert", "BertForMaskedLM")
    _fake_model_dir(tmp_path / "bert-clf", "BertForSequenceClassification")
    (tmp_path / "d.jsonl").write_text('{"text": "good", "label": 1}\n')
    path = tmp_path / "pipeline.yaml"
    path.write_text(HEAD_PIPELINE.format(base_task=", task: sequence-classification, num_labels: 2"))
    p = load_pipeline(path)
    Planner(p, Store(tmp_path / "cache")).preflight(graph.topo_order(p))  # no PipelineError
    # a base saved as a classifier needs no task: either
    path.write_text(HEAD_PIPELINE.format(base_task="").replace("source: bert}", "source: bert-clf}", 1))
    p = load_pipeline(path)
    Planner(p, Store(tmp_path / "cache")).preflight(graph.topo_order(p))


# -- 6. YAML errors in plain words ---------------------------------------------------------

YAML_CASES = [
    ("deeper-than-its-mapping", """\
        weightflow: 1
        steps:
          a: {op: load, source: ./m}
            b: {op: load, source: ./n}
        """, 4, ["this line is indented more than its mapping", "check the indentation of line 4"]),
    ("lines-up-with-nothing", """\
        weightflow: 1
        steps:
          a:
            op: load
           source: ./m
        """, 5, ["line 5 is indented to column 4, which lines up with no key above it",
                 "check the indentation of line 5"]),
    ("deeper-than-a-key-with-a-value", """\
        weightflow: 1
        steps:
          a:
            op: load
              source: ./m
        """, 5, ["line 5 is indented more than line 4 above it, whose key already has a value",
                 "check the indentation of line 5"]),
    ("tab", "weightflow: 1\nsteps:\n\ta: {op: load, source: ./m}\n", 3,
     ["line 3 is indented with a tab", "replace the tab with spaces"]),
    ("unclosed-quote", """\
        weightflow: 1
        steps:
          a: {op: load, source: "./m}
          b: {op: load, source: ./n}
        """, 5, ['the " opened on line 3, column 25 is never closed', 'add the closing "']),
    ("unclosed-brace", """\
        weightflow: 1
        steps:
          a: {op: load, source: ./m
          b: {op: load, source: ./n}
        """, 4, ["the '{' opened on line 3, column 6 is not closed", "add '}'"]),
    ("mismatched-bracket", """\
        weightflow: 1
        steps:
          m: {op: merge, method: linear, models: [a, b}
        """, 3, ["the '[' opened on line 3, column 42 is closed with '}'", "close it with ']'"]),
    ("list-item-in-a-mapping", """\
        weightflow: 1
        steps:
          a:
            op: load
            - ./m
        """, 5, ["line 5 starts a list item ('- ') inside a mapping", "check the indentation of line 5"]),
    ("colon-in-a-value", """\
        weightflow: 1
        description: merge: two models
        steps: {}
        """, 2, ["a ': ' inside the value on line 2", "quote the value"]),
    ("no-space-after-colon", """\
        weightflow: 1
        steps:
          a:
            op:load
            source: ./m
        """, 5, ["line 4 has no space after its ':' ('op:load')", "write 'key: value'"]),
    ("key-without-colon", """\
        weightflow: 1
        steps:
          a:
            op: load
          source
        """, 6, ["line 5 ('source') is neither 'key: value' nor a list item", "add the ':'"]),
]


@pytest.mark.parametrize(("text", "line", "fragments"), [c[1:] for c in YAML_CASES], ids=[c[0] for c in YAML_CASES])
def test_yaml_mistakes_are_explained(tmp_path, text, line, fragments):
    with pytest.raises(PipelineError) as info:
        parse_text(textwrap.dedent(text), tmp_path / "p.yaml", "p.yaml")
    [diag] = info.value.diagnostics
    assert diag.line == line, diag.format()
    assert diag.message.startswith("YAML syntax error: "), diag.message
    for fragment in fragments:
        assert fragment in diag.message, diag.message
    assert "(the YAML parser says: " in diag.message  # the parser's words stay, for searching


def test_duplicate_keys_still_name_both_lines(tmp_path):
    with pytest.raises(PipelineError) as info:
        parse_text("weightflow: 1\nsteps:\n  a: {op: load, source: ./m}\n  a: {op: load, source: ./n}\n",
                   tmp_path / "p.yaml", "p.yaml")
    [diag] = info.value.diagnostics
    assert (diag.line, diag.step) == (4, "a") and "first defined on line 3" in diag.message


def test_cli_prints_the_translation_without_a_traceback(tmp_path, capsys):
    path = tmp_path / "p.yaml"
    path.write_text("weightflow: 1\nsteps:\n  a: {op: load, source: ./m}\n    b: {op: load, source: ./n}\n")
    code, _, err = cli(capsys, "validate", path)
    assert code == 2
    assert f"{path}:4:5: YAML syntax error: this line is indented more than its mapping" in err
    assert "Traceback" not in err


# -- 7. the pipeline-file section ----------------------------------------------------------

def test_every_top_level_key_is_documented():
    from weightflow.dsl.lang.opdocs import TOP_LEVEL_DOCS, language_markdown
    from weightflow.dsl.lang.pipeline import TOP_LEVEL_KEYS

    assert set(TOP_LEVEL_DOCS) == set(TOP_LEVEL_KEYS)
    text = language_markdown()
    for key in TOP_LEVEL_KEYS:
        assert f"| `{key}` |" in text
    for sub in ("`r`", "`target_modules`", "`samples`", "`seq_len`"):  # lora and calibration sub-keys
        assert f"| {sub} |" in text


def test_the_example_in_the_pipeline_file_section_validates(tmp_path):
    from weightflow.dsl.lang.opdocs import language_markdown

    block = language_markdown().split("```yaml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "data").mkdir()
    for name in ("task_a.jsonl", "task_b.jsonl", "calibration.txt"):  # validate checks they exist
        (tmp_path / "data" / name).write_text('{"text": "x"}\n')
    p = parse_text(block, tmp_path / "example.yaml")
    assert list(p.steps) == ["base", "ft_a", "ft_b", "delta_a", "delta_b", "merged", "pruned"]
    assert p.steps["merged"].params.density == 0.5  # ${vars.density} keeps its type
    assert p.steps["ft_a"].params.lora.r == 8 and p.steps["pruned"].params.calibration.samples == 32
    assert p.outputs["pruned"] == tmp_path / "out" / "merged-pruned"


def test_ops_language_prints_the_section_without_torch(tmp_path):
    import subprocess
    import sys

    code = ("import sys; from weightflow.dsl.cli import main; rc = main(['ops', '--language']); "
            "assert 'torch' not in sys.modules, 'torch imported'; raise SystemExit(rc)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("## The pipeline file") and "| `reproducible` |" in r.stdout


def test_write_refreshes_the_language_block_where_it_has_markers(tmp_path):
    from weightflow.dsl.lang.opdocs import (
        LANGUAGE_BEGIN,
        LANGUAGE_END,
        README_BEGIN,
        README_END,
        language_markdown,
    )

    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{LANGUAGE_BEGIN}\nold\n{LANGUAGE_END}\n\n{README_BEGIN}\nold\n{README_END}\n")
    assert main(["ops", "--markdown", "--write", str(readme)]) == 0
    text = readme.read_text()
    assert text.split(LANGUAGE_BEGIN)[1].split(LANGUAGE_END)[0].strip() == language_markdown().strip()
    assert "\nold\n" not in text
