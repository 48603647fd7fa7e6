# Two commands are all the set-up there is: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.aax-installed
# The CPU wheel is local here; on a user's machine the same pin fetches the normal build.
TORCH_PIN ?= torch==2.13.0

.PHONY: install test demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, so that pip never resolves the multi-GB CUDA build for the project
	$(BIN)/python -m pip install -q "$(TORCH_PIN)"
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/aax demo --out demo-run

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_annotate.py --out benchmarks/results

clean:
	rm -rf $(VENV) demo-run .pytest_cache
