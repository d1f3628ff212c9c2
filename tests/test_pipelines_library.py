"""Every pipeline in pipelines/ and examples/ validates; the committed schema is current."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
FILES = sorted(list((ROOT / "pipelines").glob("*.yaml")) + list((ROOT / "examples").glob("*.yaml")))
DATA_SUFFIXES = (".txt", ".jsonl", ".json", ".csv", ".parquet")


def test_there_are_library_pipelines():
    names = {f.name for f in FILES}
    assert {"dare-ties-merge.yaml", "delta-patching.yaml", "quickstart.yaml"} <= names


def _data_paths(node):
    """Every string in a YAML document that names a data file."""
    if isinstance(node, dict):
        for v in node.values():
            yield from _data_paths(v)
    elif isinstance(node, list):
        for v in node:
            yield from _data_paths(v)
    elif isinstance(node, str) and node.endswith(DATA_SUFFIXES) and "${" not in node:
        yield node


@pytest.mark.parametrize("path", FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_pipeline_validates(path, tmp_path):
    """Validated as a user would after preparing its inputs: the file is copied into an empty
    folder where every data file it names (literally or through vars) exists as a placeholder
    (data files are built at setup time or are the user's own; models are not opened here)."""
    from weightflow.dsl.lang.pipeline import load_pipeline

    text = path.read_text()
    raw = yaml.safe_load(text)
    assert raw.get("name") and text.lstrip().startswith("#"), "needs a header comment and a name"
    copy = tmp_path / path.name
    copy.write_text(text)
    for rel in set(_data_paths(raw)):
        f = tmp_path / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("placeholder\n")
    pipeline = load_pipeline(copy)
    assert pipeline.steps


@pytest.mark.parametrize("path", FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_pipeline_matches_json_schema(path):
    import jsonschema

    schema = json.loads((ROOT / "pipelines" / "weightflow.schema.json").read_text())
    jsonschema.validate(yaml.safe_load(path.read_text()), schema)


def test_committed_schema_is_current():
    from weightflow.dsl.lang.schema import language_schema

    committed = json.loads((ROOT / "pipelines" / "weightflow.schema.json").read_text())
    assert committed == json.loads(json.dumps(language_schema())), \
        "pipelines/weightflow.schema.json is stale: run `weightflow schema > pipelines/weightflow.schema.json`"
