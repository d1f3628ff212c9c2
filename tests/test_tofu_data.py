"""The TOFU-style benchmark's data (examples/tofu.py): deterministic, and its splits are what
their names say."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import tofu  # noqa: E402


def test_the_files_are_the_same_bytes_every_time(tmp_path):
    tofu.write(tmp_path / "a")
    tofu.write(tmp_path / "b")
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir()) and len(names) == 10
    for n in names:
        assert (tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes()


def test_forget_and_retain_partition_the_training_set_by_author():
    files = tofu.build()
    full = files["full"]
    assert len(full) == tofu.AUTHORS * tofu.QA_PER_AUTHOR
    key = lambda rows: {(r["author"], r["question"]) for r in rows}  # noqa: E731
    assert len(key(full)) == len(full)  # no question twice
    for split, percent in tofu.SPLITS.items():
        forget, retain = files[f"forget{split}"], files[f"retain{100 - percent}"]
        assert key(forget) | key(retain) == key(full) and not key(forget) & key(retain)
        assert len({r["author"] for r in forget}) == max(1, tofu.AUTHORS * percent // 100)
        assert not {r["author"] for r in forget} & {r["author"] for r in retain}
    assert key(files["forget01"]) < key(files["forget05"]) < key(files["forget10"])
    trained = {r["author"] for r in full}
    assert not {r["author"] for r in files["holdout10"]} & trained
    assert len(files["holdout10"]) == len(files["forget10"])
    assert not {r["author"] for r in files["retain_eval"]} & {r["author"] for r in files["forget10"]}


def test_answers_paraphrases_and_perturbations_differ_as_they_should():
    for rows in tofu.build().values():
        for r in rows:
            assert r["prompt"] == r["question"] and r["response"] == r["answer"]
            wrong = r["perturbed_answer"]
            assert len(wrong) == 3 and len(set(wrong)) == 3 and r["paraphrased_answer"] not in wrong
