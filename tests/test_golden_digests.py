"""Every op and method on tiny models gives the recorded output digests, on any x86-64 CPU.

``tests/golden/digests.json`` was recorded before the code was reorganised into rooms and
registries (issue 11); a change that must not alter behaviour has to leave every digest
as recorded.  The pipeline runs in strict reproducibility mode, in a subprocess that builds
its own random input models (tests/test_reproducibility.py's child), so the recorded bytes
hold on every x86-64 CPU and thread count, not only on the machine that recorded them.
An intended change of an op's output bumps the op's version and is listed in CHANGELOG.md,
and then the digest here is re-recorded with::

    python tests/golden/record.py > tests/golden/digests.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

GOLDEN = Path(__file__).parent / "golden"
sys.path.insert(0, str(Path(__file__).parent))

from test_reproducibility import run_in  # noqa: E402


def run_golden(root: Path) -> dict[str, str]:
    """Every golden step's digest, computed in strict mode in a fresh subprocess."""
    result = run_in({}, "strict", root)
    assert result["platform"] == "cpu-strict"
    return result["digests"]


def test_every_step_keeps_its_recorded_digest(tmp_path):
    expected = json.loads((GOLDEN / "digests.json").read_text())
    got = run_golden(tmp_path)
    assert set(got) == set(expected)
    changed = {n: (expected[n][:12], got[n][:12]) for n in expected if got[n] != expected[n]}
    assert not changed, f"output digests changed (recorded -> now): {changed}"
