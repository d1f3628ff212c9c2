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


@pytest.mark.parametrize("path", FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_pipeline_validates(path, tmp_path):
    from weightflow.dsl.pipeline import load_pipeline

    raw = yaml.safe_load(path.read_text())
    assert raw.get("name") and path.read_text().lstrip().startswith("#"), "needs a header comment and a name"
    overrides = {}
    for name, value in (raw.get("vars") or {}).items():
        if isinstance(value, str) and value.endswith(DATA_SUFFIXES):
            f = tmp_path / Path(value).name
            f.write_text("placeholder\n")
            overrides[name] = str(f)
    pipeline = load_pipeline(path, overrides)
    assert pipeline.steps


@pytest.mark.parametrize("path", FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_pipeline_matches_json_schema(path):
    import jsonschema

    schema = json.loads((ROOT / "pipelines" / "weightflow.schema.json").read_text())
    jsonschema.validate(yaml.safe_load(path.read_text()), schema)


def test_committed_schema_is_current():
    from weightflow.dsl.schema import language_schema

    committed = json.loads((ROOT / "pipelines" / "weightflow.schema.json").read_text())
    assert committed == json.loads(json.dumps(language_schema())), \
        "pipelines/weightflow.schema.json is stale: run `weightflow schema > pipelines/weightflow.schema.json`"
