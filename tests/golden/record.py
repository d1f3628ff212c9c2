"""Print the golden pipeline's output digests as JSON (see tests/test_golden_digests.py)."""

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from test_golden_digests import run_golden  # noqa: E402

if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(run_golden(Path(tmp)), indent=1, sort_keys=True))
