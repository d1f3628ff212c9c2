"""Hostile input is refused with a clear error (exit 2), never a traceback or an
"internal error" (exit 3): broken data files (bad UTF-8, absurdly nested JSON, huge
CSV fields), unknown or explosive ``--var`` values, and oversized pipeline files."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from weightflow.dsl.lang.diagnostics import OpError, PipelineError
from weightflow.dsl.lang.pipeline import load_pipeline, parse_text
from weightflow.ops.lib.data import MAX_JSON_DEPTH, read_records

LLAMA = ("{model_type: llama, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, "
         "num_attention_heads: 4, num_key_value_heads: 2, vocab_size: 256}")


def cli(*args, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "weightflow", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, check=False)


def assert_clean_refusal(res: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit 2, every fragment in stderr, and no traceback / internal error."""
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr and "internal error" not in res.stderr, res.stderr
    for f in fragments:
        assert f in res.stderr, (f, res.stderr)


# -- 13. broken data files -------------------------------------------------------------

def finetune_pipeline(tmp_path: Path, data: str) -> Path:
    """A tiny pipeline whose finetune step reads ``data``; its preflight reads the file
    before any step (or torch) runs."""
    path = tmp_path / "p.yaml"
    path.write_text(textwrap.dedent(f"""\
        weightflow: 1
        steps:
          base: {{op: load, config: {LLAMA}}}
          ft: {{op: finetune, model: base, data: {data}, max_steps: 1}}
        """))
    return path


BAD_DATA = [
    # (file name, bytes, fragments the error must show)
    ("bad.jsonl", b'{"text": "fine"}\n{"text": "caf\xc3\xa9"}\n{"text": "b\xffd"}\n',
     ["bad.jsonl:3", "not valid UTF-8", "byte 0xff", "byte offset 46"]),
    ("bad.csv", b"text,label\nok,1\nb\xc3(d,0\n",
     ["bad.csv:3", "not valid UTF-8", "byte 0xc3", "byte offset 17"]),
    ("bad.txt", b"one line\ntwo \xe2\x82 lines\n",
     ["bad.txt:2", "not valid UTF-8", "byte 0xe2", "byte offset 13"]),
    ("deep.jsonl", b'{"text": "a"}\n' + b"[" * 200_000 + b"\n",
     ["deep.jsonl:2", f"more than {MAX_JSON_DEPTH} levels"]),
    ("deep150.jsonl", b'{"text": "a"}\n{"text": ' + b"[" * 150 + b"]" * 150 + b"}\n",
     ["deep150.jsonl:2", f"more than {MAX_JSON_DEPTH} levels"]),
    ("deep.json", b'[{"text": "a"},\n {"text": ' + b"[" * 200_000 + b"]" * 200_000 + b"}]\n",
     ["deep.json:2", f"more than {MAX_JSON_DEPTH} levels"]),
    ("bad.json", b'[{"text": "a"},\n {"text": "\xc0"}]\n',
     ["bad.json:2", "not valid UTF-8", "byte 0xc0", "byte offset 27"]),
    ("wide.csv", b"text\n" + b"x" * 200_000 + b"\n",
     ["wide.csv:2", "cannot read CSV"]),
]


@pytest.mark.parametrize("name,content,fragments", BAD_DATA, ids=[c[0] for c in BAD_DATA])
def test_broken_data_file_is_a_clear_error_from_run(tmp_path, name, content, fragments):
    (tmp_path / name).write_bytes(content)
    path = finetune_pipeline(tmp_path, name)
    res = cli("run", path, "--cache-dir", tmp_path / "cache")
    assert_clean_refusal(res, "step 'ft'", *fragments)
    assert "running" not in res.stderr  # refused by the preflight, before any step ran


def test_bad_utf8_is_located_exactly_and_good_data_still_reads(tmp_path):
    data = b'{"text": "x"}\r\n{"text": "\xe9t\xe9"}\n'
    f = tmp_path / "d.jsonl"
    f.write_bytes(data)
    with pytest.raises(OpError) as info:
        read_records(f)
    offset = data.index(b"\xe9")
    msg = str(info.value)
    assert f"{f}:2:" in msg and f"byte offset {offset}" in msg and f"column {offset - 15 + 1}" in msg
    # ... while good data inside the limits reads as before
    nested = "[" * (MAX_JSON_DEPTH - 1) + "]" * (MAX_JSON_DEPTH - 1)
    f = tmp_path / "ok.jsonl"
    f.write_text('{"text": "caf\u00e9 \u2028 ok"}\n\n{"text": "b", "x": ' + nested + "}\n", encoding="utf-8")
    rows = read_records(f)
    assert rows[0]["text"] == "caf\u00e9 \u2028 ok" and rows[1]["text"] == "b"
    c = tmp_path / "ok.csv"
    c.write_bytes(b'text,label\r\n"multi\nline \xc3\xa9",1\r\nplain,0\r\n')
    assert read_records(c) == [{"text": "multi\nline \u00e9", "label": "1"}, {"text": "plain", "label": "0"}]
    t = tmp_path / "ok.txt"
    t.write_bytes(b"a\r\nb\rc\n\n \n")
    assert read_records(t) == [{"text": "a"}, {"text": "b"}, {"text": "c"}]
    assert read_records(t, limit=2) == [{"text": "a"}, {"text": "b"}]


def test_limit_stops_reading_before_later_bad_bytes(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_bytes(b'{"text": "a"}\n{"text": "b"}\n{"text": "\xff"}\n')
    assert len(read_records(f, limit=2)) == 2
    with pytest.raises(OpError, match=r"d\.jsonl:3: not valid UTF-8"):
        read_records(f)


# -- 14. --var -------------------------------------------------------------------------

VAR_PIPELINE = f"""\
weightflow: 1
vars: {{drop_rate: 0.1, w: [0.5, 0.5]}}
steps:
  a: {{op: load, config: {LLAMA}}}
  b: {{op: load, config: {LLAMA}, init_seed: 1}}
  m: {{op: merge, method: linear, models: [a, b], weights: "${{vars.w}}"}}
"""


def test_unknown_var_is_an_error_with_a_suggestion(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(VAR_PIPELINE)
    res = cli("validate", path, "--var", "drop_rat=0.2")
    assert_clean_refusal(res, "--var drop_rat", "did you mean 'drop_rate'?", "drop_rate, w")
    assert cli("validate", path, "--var", "drop_rate=0.2").returncode == 0
    # values stay YAML, and text that is not YAML stays a string
    from weightflow.dsl.cli import _var_overrides

    assert _var_overrides(["drop_rate=0.3", "w=[1, 2]", "s=a: b: c", "e="]) == \
        {"drop_rate": 0.3, "w": [1, 2], "s": "a: b: c", "e": ""}


def test_unknown_var_in_a_pipeline_without_vars(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(f"weightflow: 1\nsteps:\n  a: {{op: load, config: {LLAMA}}}\n")
    with pytest.raises(PipelineError) as info:
        load_pipeline(path, {"lr": 1})
    (d,) = info.value.diagnostics
    assert "--var lr" in d.message and "defines no variables" in d.message


def test_var_override_with_a_huge_integer_is_refused(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(VAR_PIPELINE)
    with pytest.raises(PipelineError) as info:
        load_pipeline(path, {"drop_rate": 2**70})
    (d,) = info.value.diagnostics
    assert "--var drop_rate: integer too large" in d.message and d.line == 2


def test_var_alias_bomb_is_refused_quickly(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(VAR_PIPELINE)
    # &a is 9 ones, &b 9 copies of *a, ... &i 9 copies of *h: 9**9 values, in < 400 bytes
    levels = ["&a [1,1,1,1,1,1,1,1,1]"] + [f"&{c} [" + ",".join(["*" + p] * 9) + "]"
                                           for p, c in zip("abcdefgh", "bcdefghi", strict=True)]
    value = "[" + ", ".join(levels) + "]"
    assert len(value) < 400
    start = time.monotonic()
    res = cli("validate", path, "--var", f"w={value}", timeout=30)
    assert time.monotonic() - start < 10
    assert_clean_refusal(res, "--var w", "aliases", "200000")


@pytest.mark.parametrize("value,fragment", [
    ("[" * 5000, "nests too deeply"),
    ("&x [1, *x]", "would contain itself"),
    ("{a: 1, a: 2}", "duplicate key 'a'"),
])
def test_var_values_get_the_file_limits(tmp_path, value, fragment):
    path = tmp_path / "p.yaml"
    path.write_text(VAR_PIPELINE)
    assert_clean_refusal(cli("validate", path, "--var", f"w={value}"), "--var w", fragment)


# -- 15. oversized pipeline files --------------------------------------------------------

def test_pipeline_file_over_the_size_limit_is_refused_before_parsing(tmp_path):
    path = tmp_path / "big.yaml"
    body = f"weightflow: 1\nsteps:\n  a: {{op: load, config: {LLAMA}}}\ndescription: "
    path.write_text(body + "x" * (5 * 1024 * 1024) + "\n")
    start = time.monotonic()
    res = cli("validate", path)
    assert time.monotonic() - start < 10
    assert_clean_refusal(res, "big.yaml:1:1", "5.0 MB", "limit is 4 MB")


def test_many_nodes_without_aliases_does_not_blame_aliases(tmp_path, monkeypatch):
    from weightflow.dsl.lang import yamlsource

    monkeypatch.setattr(yamlsource, "MAX_NODES", 2000)  # the real 200,000 takes pure-Python seconds
    keys = "\n".join(f"  k{i}: {i}" for i in range(3000))
    text = f"weightflow: 1\nsteps:\n  a: {{op: load, config: {LLAMA}}}\nvars:\n{keys}\n"
    with pytest.raises(PipelineError) as info:
        parse_text(text, tmp_path / "wide.yaml", display="wide.yaml")
    (d,) = info.value.diagnostics
    assert "more than 2000 values" in d.message and "alias" not in d.message
    # it stops reading where the limit is reached (the 2001st value: root, weightflow,
    # steps, a, op, config and its 7 entries, vars -> 14 values before the vars' values)
    assert (d.line, d.col) == (5 + 2000 - 14, len(f"  k{2000 - 14}: ") + 1)
    # aliases that expand past the limit are still blamed on the aliases
    bomb = "weightflow: 1\na0: &a0 [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]\n" for i in range(1, 4))
    with pytest.raises(PipelineError) as info:
        parse_text(bomb + "steps: {base: {op: load, source: ./m}}\n", tmp_path / "b.yaml")
    assert "expands (through aliases) to more than 2000 values" in info.value.diagnostics[0].message


def test_pipeline_file_with_bad_utf8_names_line_and_offset(tmp_path):
    path = tmp_path / "u.yaml"
    path.write_bytes(b"weightflow: 1\nsteps: {a: {op: load, source: ./m}}\n# caf\xe9\n")
    with pytest.raises(PipelineError) as info:
        load_pipeline(path)
    (d,) = info.value.diagnostics
    assert (d.line, d.col) == (3, 6) and "not valid UTF-8" in d.message and "byte offset 55" in d.message


def test_parse_text_applies_the_size_limit_too():
    with pytest.raises(PipelineError) as info:
        parse_text("weightflow: 1\n#" + "x" * (5 * 1024 * 1024) + "\n", Path("/nonexistent/p.yaml"),
                   display="p.yaml")
    (d,) = info.value.diagnostics
    assert "limit is 4 MB" in d.message
