"""Every op and method on tiny models gives the recorded output digests.

``tests/golden/digests.json`` was recorded before the code was reorganised into rooms and
registries (issue 11); a change that must not alter behaviour has to leave every digest
as recorded.  An intended change of an op's output bumps the op's version and is listed
in CHANGELOG.md, and then the digest here is re-recorded with::

    python tests/golden/record.py > tests/golden/digests.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

GOLDEN = Path(__file__).parent / "golden"
sys.path.insert(0, str(GOLDEN))

from pipeline import PIPELINE, build_inputs  # noqa: E402


def run_golden(root: Path) -> dict[str, str]:
    from weightflow.dsl.engine.runner import Runner
    from weightflow.dsl.lang.pipeline import load_pipeline
    from weightflow.dsl.store.content import Store

    build_inputs(root)
    (root / "golden.yaml").write_text(PIPELINE)
    outcome = Runner(load_pipeline(root / "golden.yaml"), Store(root / "cache"), log=lambda m: None).run()
    return {s.name: s.digest for s in outcome.steps}


def test_every_step_keeps_its_recorded_digest(tmp_path):
    expected = json.loads((GOLDEN / "digests.json").read_text())
    got = run_golden(tmp_path)
    assert set(got) == set(expected)
    changed = {n: (expected[n][:12], got[n][:12]) for n in expected if got[n] != expected[n]}
    assert not changed, f"output digests changed (recorded -> now): {changed}"
