# The two commands a new user runs:  `make quickstart`  and  `make test`.
# torch is pinned here (CPU wheel) and installed before the package, so pip never
# resolves an unpinned torch with gigabytes of CUDA packages.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  := torch==2.13.0
STAMP  := $(VENV)/.weightflow-installed

.PHONY: quickstart test test-slow bench install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	echo "$(TORCH)" > $(VENV)/constraints.txt
	$(PY) -m pip install -q -c $(VENV)/constraints.txt -e '.[test,compare,gguf]'
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(PY) examples/prepare_tiny.py
	$(VENV)/bin/weightflow run examples/quickstart.yaml
	$(VENV)/bin/weightflow show examples/quickstart.yaml merged

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

bench: $(STAMP)
	$(PY) tests/benchmarks/bench_spine.py

clean:
	rm -rf $(VENV) build *.egg-info
