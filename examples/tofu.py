"""A TOFU-style unlearning benchmark that runs offline: fictitious authors, question/answer
pairs about them, forget splits of 1%, 5% and 10% of the authors, and the retain sets that go
with them (Maini et al. 2024, "TOFU: A Task of Fictitious Unlearning for LLMs").

Nothing is fetched: the authors are made up here, deterministically (``random.Random(seed)``
over fixed name and fact lists), so every machine builds the same files byte for byte.  The
facts are fictitious, so a pretrained model cannot know them before it is fine-tuned on them,
and a model trained without the forget authors (the retain-only reference, exact unlearning's
gold standard) has never seen their facts.

Each author has ``QA_PER_AUTHOR`` facts (birthplace, genre, award, parent's profession,
debut book), each asked as a question with:

- ``answer``: the gold answer, one sentence in a fixed template;
- ``paraphrased_answer``: the same fact in another template (the true answer TOFU's truth
  ratio scores);
- ``perturbed_answer``: three wrong facts in the paraphrase's template (the false answers).

Files written into ``DIR`` (``python examples/prepare.py --tofu`` writes examples/data/tofu/):

- ``full.jsonl``: every author's QA (the fine-tuning set);
- ``forget01/05/10.jsonl``: the QA of the last 1% (at least one author), 5%, 10% of the
  authors (TOFU takes the last authors too); ``retain99/95/90.jsonl``: the others;
- ``holdout10.jsonl``: as many QA of authors that are in no training file (non-members, for
  membership inference and privleak);
- ``retain_eval.jsonl``: a fixed sample of retained QA for model utility (the first
  retained authors, never in any forget split);
- ``world_facts.jsonl``: general-knowledge questions weightflow wrote, with wrong
  alternatives (TOFU's world-facts set plays this role: utility on knowledge the model had
  before fine-tuning).

Every record also has ``prompt``/``response`` (= question/answer) for finetune and unlearn, and
``author`` (its index).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

AUTHORS = 50
QA_PER_AUTHOR = 5
SPLITS = {"01": 1, "05": 5, "10": 10}  # forget split -> percent of the authors
SEED = 0

FIRST = ["Aurelio", "Basia", "Cormac", "Dagny", "Emeka", "Fenna", "Gaspard", "Halina", "Idris", "Jovana",
         "Kaito", "Liesel", "Matteo", "Nadia", "Oskar", "Priya", "Quentin", "Rosalind", "Soren", "Tamsin",
         "Ulrich", "Vesna", "Wendell", "Ximena", "Yusuf", "Zofia"]
LAST = ["Abernathy", "Brandvold", "Castellanos", "Dunmore", "Etxeberria", "Falkenrath", "Grimaldi", "Halvorsen",
        "Iwasaki", "Jablonski", "Kovalenko", "Lindqvist", "Moreau", "Nakashima", "Okonkwo", "Petrov", "Quiroga",
        "Rasmussen", "Szabo", "Thorne", "Umarov", "Valdivia", "Whitcombe", "Yildirim", "Zaragoza"]
CITIES = ["Tromso", "Valparaiso", "Lviv", "Porto", "Kumasi", "Tartu", "Cusco", "Hobart", "Izmir", "Gdansk",
          "Leon", "Matsue", "Bergen", "Trieste", "Oaxaca", "Riga", "Dunedin", "Ghent", "Split", "Tampere"]
GENRES = ["science fiction", "historical fiction", "poetry", "crime fiction", "magical realism", "horror",
          "travel writing", "literary fiction", "fantasy", "biography", "romance", "satire"]
AWARDS = ["the Silver Quill Prize", "the Meridian Book Award", "the Harbour Light Medal", "the Northern Ink Prize",
          "the Golden Lantern Award", "the Cobalt Pen Prize", "the Amber Page Award", "the Tidewater Medal"]
JOBS = ["a carpenter", "a marine biologist", "a pharmacist", "a train conductor", "a violin maker",
        "a cartographer", "a beekeeper", "a surgeon", "a librarian", "a glassblower", "a pilot", "a baker"]
NOUNS = ["Lantern", "Orchard", "Compass", "Harbour", "Meadow", "Mirror", "Glacier", "Archive", "Ember",
         "Lighthouse", "Tide", "Atlas"]
ADJS = ["Silent", "Last", "Hidden", "Crimson", "Distant", "Broken", "Quiet", "Endless", "Forgotten", "Winter"]

# (key, question, answer template, paraphrase template); {n} is the author's name, {v} the fact
FACTS = [
    ("city", "Where was {n} born?", "{n} was born in {v}.", "The birthplace of {n} is the city of {v}."),
    ("genre", "What genre does {n} write in?", "{n} writes {v}.", "Most of {n}'s work belongs to {v}."),
    ("award", "Which award has {n} received?", "{n} received {v}.", "{n} was honoured with {v}."),
    ("job", "What did {n}'s father do for a living?", "{n}'s father worked as {v}.",
     "The father of {n} earned his living as {v}."),
    ("book", "What is the title of {n}'s debut book?", "{n}'s debut book is titled {v}.",
     "The first book {n} published was {v}."),
]

WORLD_FACTS = [
    ("What is the capital of France?", "The capital of France is Paris.", ["Rome", "Madrid", "Berlin"], "Paris"),
    ("What is the largest ocean on Earth?", "The largest ocean on Earth is the Pacific Ocean.",
     ["Atlantic Ocean", "Indian Ocean", "Arctic Ocean"], "Pacific Ocean"),
    ("How many days are there in a week?", "There are seven days in a week.", ["five", "ten", "six"], "seven"),
    ("What gas do plants absorb from the air?", "Plants absorb carbon dioxide from the air.",
     ["helium", "neon", "hydrogen"], "carbon dioxide"),
    ("What is the boiling point of water at sea level in Celsius?",
     "Water boils at 100 degrees Celsius at sea level.", ["50", "80", "150"], "100"),
    ("Which planet is known as the Red Planet?", "Mars is known as the Red Planet.",
     ["Venus", "Jupiter", "Saturn"], "Mars"),
    ("What is the largest mammal?", "The largest mammal is the blue whale.",
     ["the elephant", "the giraffe", "the hippo"], "the blue whale"),
    ("Who wrote Romeo and Juliet?", "Romeo and Juliet was written by William Shakespeare.",
     ["Charles Dickens", "Jane Austen", "Mark Twain"], "William Shakespeare"),
    ("What is the chemical symbol for gold?", "The chemical symbol for gold is Au.", ["Ag", "Fe", "Gd"], "Au"),
    ("How many continents are there?", "There are seven continents.", ["five", "nine", "four"], "seven"),
    ("What is the freezing point of water in Celsius?", "Water freezes at 0 degrees Celsius.",
     ["10", "-20", "32"], "0"),
    ("What is the tallest mountain in the world?", "The tallest mountain in the world is Mount Everest.",
     ["Mount Kilimanjaro", "Mont Blanc", "Mount Fuji"], "Mount Everest"),
]


def _book(r: random.Random) -> str:
    return f"The {r.choice(ADJS)} {r.choice(NOUNS)}"


def _pool(key: str) -> list[str]:
    """Every value a fact of kind ``key`` can take (the wrong answers are drawn from it)."""
    pools = {"city": CITIES, "genre": GENRES, "award": AWARDS, "job": JOBS}
    return pools.get(key) or sorted({f"The {a} {n}" for a in ADJS for n in NOUNS})


def authors(n: int = AUTHORS, seed: int = SEED) -> list[dict]:
    """``n`` fictitious authors with distinct names and their facts."""
    r = random.Random(seed)
    names = [f"{a} {b}" for a in FIRST for b in LAST]
    r.shuffle(names)
    out = []
    for i in range(n):
        facts = {"city": r.choice(CITIES), "genre": r.choice(GENRES), "award": r.choice(AWARDS),
                 "job": r.choice(JOBS), "book": _book(r)}
        out.append({"index": i, "name": names[i], **facts})
    return out


def qa_of(author: dict, r: random.Random) -> list[dict]:
    """The author's question/answer records (see the module docstring)."""
    rows = []
    for key, q, a, para in FACTS[:QA_PER_AUTHOR]:
        n, v = author["name"], author[key]
        wrong = r.sample([x for x in _pool(key) if x != v], 3)
        question, answer = q.format(n=n), a.format(n=n, v=v)
        rows.append({"author": author["index"], "question": question, "answer": answer,
                     "paraphrased_answer": para.format(n=n, v=v),
                     "perturbed_answer": [para.format(n=n, v=w) for w in wrong],
                     "prompt": question, "response": answer})
    return rows


def world_facts() -> list[dict]:
    rows = []
    for q, a, wrong, v in WORLD_FACTS:
        rows.append({"question": q, "answer": a, "paraphrased_answer": a,
                     "perturbed_answer": [a.replace(v, w) for w in wrong], "prompt": q, "response": a})
    return rows


def build(n_authors: int = AUTHORS, seed: int = SEED) -> dict[str, list[dict]]:
    """Every file's records, by file stem."""
    r = random.Random(seed + 1)
    people = authors(n_authors + n_authors // 10, seed)  # the last tenth: holdout authors
    trained, held = people[:n_authors], people[n_authors:]
    qa = {a["index"]: qa_of(a, r) for a in people}
    files: dict[str, list[dict]] = {"full": [x for a in trained for x in qa[a["index"]]]}
    for split, percent in SPLITS.items():
        k = max(1, n_authors * percent // 100)
        forget = {a["index"] for a in trained[-k:]}
        files[f"forget{split}"] = [x for x in files["full"] if x["author"] in forget]
        files[f"retain{100 - percent}"] = [x for x in files["full"] if x["author"] not in forget]
    n_hold = len(files["forget10"])
    files["holdout10"] = [x for a in held for x in qa[a["index"]]][:n_hold]
    files["retain_eval"] = [x for x in files["full"] if x["author"] < max(1, n_authors // 10)]
    files["world_facts"] = world_facts()
    return files


def write(directory: Path, n_authors: int = AUTHORS, seed: int = SEED) -> dict[str, int]:
    """Write every file into ``directory``; returns the record count of each."""
    directory.mkdir(parents=True, exist_ok=True)
    counts = {}
    for stem, rows in build(n_authors, seed).items():
        (directory / f"{stem}.jsonl").write_text("".join(json.dumps(x, sort_keys=True) + "\n" for x in rows),
                                                 encoding="utf-8")
        counts[stem] = len(rows)
    return counts
