# `make demo` and `make test` work on a fresh machine with only Python 3.11: they create
# .venv if it is missing and install the pinned dependencies from constraints.txt.
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-gpu demo bench plot wheel clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q -c constraints.txt torch triton numpy
	$(VPY) -m pip install -q -c constraints.txt -e ".[test,bench]"
	touch $(STAMP)

# CPU machines: Triton kernels under the interpreter + the CPU path; GPU tests are skipped.
test: $(STAMP)
	$(VPY) -m pytest -n 2 -q

# On a GPU machine (no venv needed there: `PYTHONPATH=src python3 -m pytest -m gpu`).
test-gpu: $(STAMP)
	$(VPY) -m pytest -q -m gpu

demo: $(STAMP)
	$(VENV)/bin/flashtile demo

bench:
	PYTHONPATH=src python3 bench/bench_attention.py

plot: $(STAMP)
	$(VPY) bench/plot.py bench/results/h100.json docs/bench_h100.png

wheel: $(STAMP)
	$(VPY) -m pip wheel --no-deps -w dist .

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .hypothesis
