"""Model cards: `export` and `outputs:` write a Hugging Face README.md whose front matter the Hub
reads (base_model, tags, library_name, model-index with the report's scores) and whose text
carries the whole lineage back to every loaded source, listed in the export marker."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import yaml
from conftest import run, write_pipeline

SHA = "0123456789abcdef0123456789abcdef01234567"
MARKER = "weightflow-export.json"



def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    head, _, _ = card[4:].partition("\n---\n")
    return yaml.safe_load(head)


PIPE = f"""
weightflow: 1
name: card-demo
seed: 0
steps:
  base: {{op: load, source: 'hf:acme/tiny@{SHA}'}}
  a: {{op: load, source: ../models/ft_a}}
  b: {{op: load, source: ../models/ft_b}}
  da: {{op: extract-delta, model: a, base: base}}
  db: {{op: extract-delta, model: b, base: base}}
  pa: {{op: dare-prune, delta: da, drop_rate: 0.9}}
  pb: {{op: dare-prune, delta: db, drop_rate: 0.8}}
  merged: {{op: merge, method: ties, base: base, deltas: [pa, pb], density: 1.0}}
  scores:
    op: evaluate
    models: [base, merged]
    metrics: [{{perplexity: {{data: held.jsonl}}}}, sparsity, {{delta_norm: {{base: base}}}}]
outputs: {{merged: ../out/merged, pa: ../out/pa, base: ../out/base}}
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_models):
    """A git repository (repo/.git) with the pipeline in repo/pipes/, its base from a pinned
    hub commit in a local HF cache (offline), run once with `outputs:` exported."""
    root = tmp_path_factory.mktemp("card")
    repo = root / "repo"
    (repo / ".git").mkdir(parents=True)
    (repo / "models").mkdir()
    for name in ("ft_a", "ft_b"):
        shutil.copytree(tiny_models[name], repo / "models" / name)
    hub = root / "hub" / "models--acme--tiny"
    shutil.copytree(tiny_models["base"], hub / "snapshots" / SHA)
    (hub / "refs").mkdir()
    (hub / "refs" / "main").write_text(SHA)
    pipes = repo / "pipes"
    pipes.mkdir()
    (pipes / "held.jsonl").write_text("".join(json.dumps({"input_ids": list(range(i, i + 12))}) + "\n"
                                              for i in range(1, 60, 12)))
    path = write_pipeline(pipes, PIPE, "p.yaml")
    store = root / "cache"
    from huggingface_hub import constants

    with pytest.MonkeyPatch.context() as mp:  # the hub is the local cache only (read at call time)
        mp.setattr(constants, "HF_HUB_CACHE", str(root / "hub"))
        mp.setattr(constants, "HF_HUB_OFFLINE", True)
        run(path, store)
    return path, store


def lock(path) -> dict:
    return yaml.safe_load(path.with_suffix(".lock").read_text())["steps"]


def report_of(path, store) -> dict:
    digest = lock(path)["scores"]["digest"]
    return json.loads((store / "objects" / digest[:2] / digest / "report.json").read_text())


def test_card_front_matter_is_what_the_hub_reads(project):
    path, store = project
    out = path.parent.parent / "out" / "merged"
    meta = front_matter((out / "README.md").read_text())
    assert meta["base_model"] == "acme/tiny"  # the hub source; the local fine-tunes are not hub ids
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert meta["tags"][0] == "weightflow" and {"merge", "ties", "dare"} <= set(meta["tags"])
    # model-index: every charted column of every metric the report computed for this digest
    (index,) = meta["model-index"]
    assert index["name"] == "merged"
    report = report_of(path, store)
    row = [m["digest"] for m in report["models"]].index(lock(path)["merged"]["digest"])
    want = {(metric["label"], c["name"]): report["results"][row][j]["values"][c["name"]]
            for j, metric in enumerate(report["metrics"]) for c in metric["columns"]
            if c["chart"] and report["results"][row][j]["values"].get(c["name"]) is not None}
    got = {(r["task"]["name"], m["type"]): m["value"] for r in index["results"] for m in r["metrics"]}
    assert got == want and any(label == "perplexity" for label, _ in got)
    ppl = next(r for r in index["results"] if r["task"]["name"] == "perplexity")
    assert ppl["dataset"] == {"name": "held.jsonl", "type": "held.jsonl"}
    assert ppl["task"]["type"] == "text-generation"


def test_card_carries_the_whole_lineage(project):
    from weightflow import __version__

    path, _ = project
    card = (path.parent.parent / "out" / "merged" / "README.md").read_text()
    steps = lock(path)
    for name in ("base", "a", "b", "da", "db", "pa", "pb", "merged"):
        assert f"`{name}`" in card and steps[name]["key"] in card and steps[name]["digest"] in card, name
    assert "scores" not in card.split("## Recipe")[1].split("## Evaluation")[0]  # only the lineage
    recipe = yaml.safe_load(card.split("## Recipe")[1].split("```yaml\n")[1].split("```")[0])["steps"]
    assert list(recipe) == ["base", "a", "b", "da", "db", "pa", "pb", "merged"]
    assert recipe["pa"]["drop_rate"] == 0.9 and recipe["pb"]["drop_rate"] == 0.8  # from upstream
    assert recipe["merged"]["deltas"] == ["pa", "pb"] and recipe["merged"]["method"] == "ties"
    assert recipe["da"] == {"op": "extract-delta", "base": "base", "exclude": [], "model": "a"}
    assert recipe["base"]["source"] == f"hf:acme/tiny@{SHA}"
    assert recipe["a"]["source"] == "local directory ft_a"
    assert "pipes/p.yaml" in card and str(path.parent) not in card  # relative to the git top level
    assert f"weightflow {__version__}" in card
    assert "weightflow run pipes/p.yaml --target merged" in card


def test_card_is_listed_in_the_marker_and_export_writes_the_same_one(project, tmp_path, cli):
    path, store = project
    out = path.parent.parent / "out" / "merged"
    marker = json.loads((out / MARKER).read_text())
    card = (out / "README.md").read_bytes()
    assert "README.md" in marker["files"] and marker["format"] == "dense"
    assert marker["generated"] == {"README.md": hashlib.sha256(card).hexdigest()}
    target = tmp_path / "exported"
    rc, _, err = cli("export", path, "merged", target, "--cache-dir", store)
    assert rc == 0, err
    assert (target / "README.md").read_bytes() == card  # the same card from `export` and `outputs:`
    rc, out_text, err = cli("export", path, "merged", target, "--cache-dir", store)
    assert rc == 0 and "up to date" in out_text, err
    # the card is the user's to keep: an edited one is not replaced without --force
    (target / "README.md").write_text("my notes")
    rc, _, err = cli("export", path, "merged", target, "--cache-dir", store)
    assert rc == 2 and "README.md (modified)" in err and "--force" in err
    assert (target / "README.md").read_text() == "my notes"
    rc, _, err = cli("export", path, "merged", target, "--cache-dir", store, "--force")
    assert rc == 0 and (target / "README.md").read_bytes() == card, err


def test_delta_and_loaded_model_exports(project):
    path, _ = project
    out = path.parent.parent / "out"
    meta = front_matter((out / "pa" / "README.md").read_text())
    assert meta["base_model"] == "acme/tiny"
    assert "library_name" not in meta and {"dare", "task-vector"} <= set(meta["tags"])
    text = (out / "pa" / "README.md").read_text()
    assert "the base is step `base`" in text and "drop_rate: 0.9" in text
    # a loaded model is exported as it was read: no card of ours in place of the source's own
    assert not (out / "base" / "README.md").exists()
    assert "README.md" not in json.loads((out / "base" / MARKER).read_text())["files"]


def test_a_new_score_rewrites_the_card_of_an_unchanged_model(project):
    """The model's digest is the same, but its card now has one more report: `outputs:`
    rewrites the export (an export is up to date only when its card is too)."""
    path, store = project
    copy = path.with_name("p2.yaml")
    text = PIPE.replace("../out/", "../out2/")
    copy.write_text(text)
    run(copy, store)  # in-process: the hub load is cached, and a pinned commit needs no hub to key
    card = path.parent.parent / "out2" / "merged" / "README.md"
    before = front_matter(card.read_text())["model-index"][0]["results"]
    more = "  more: {op: evaluate, models: merged, metrics: [{loss: {data: held.jsonl}}]}\n"
    copy.write_text(text.replace("outputs:", more + "outputs:"))
    outcome, status = run(copy, store)
    assert status["merged"] == "cached" and status["more"] == "executed"
    assert "exported merged -> " in "\n".join(outcome.logs)
    after = front_matter(card.read_text())["model-index"][0]["results"]
    assert after[:len(before)] == before
    assert [r["source"]["name"] for r in after[len(before):]] == ["weightflow evaluate step 'more'"]
    assert [m["type"] for m in after[-1]["metrics"]] == ["loss"]
