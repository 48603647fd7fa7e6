# Two commands are all the set-up there is: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.aax-installed
# The CPU wheel is local here; on a user's machine the same pin fetches the normal build.
TORCH_PIN ?= torch==2.13.0

.PHONY: install interop test demo bench docs clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, so that pip never resolves the multi-GB CUDA build for the project
	$(BIN)/python -m pip install -q "$(TORCH_PIN)"
	$(BIN)/python -m pip install -q -e '.[dev,ray]'
	touch $(STAMP)

# The real tools the interop tests check AAX's files against, each in its own virtual
# environment: Label Studio (with its SDK) pins numpy, pillow and OpenCV versions of its
# own and Datumaro needs a pyarrow that Label Studio refuses, so neither shares AAX's.
LS_VENV := .venv-ls
DM_VENV := .venv-dm
LABEL_STUDIO_PIN ?= label-studio==1.23.2
# Label Studio 1.23 passes sentry_sdk.init options that sentry-sdk 3 no longer accepts: its
# server then exits at start-up
LABEL_STUDIO_CONSTRAINTS ?= sentry-sdk<3
DATUMARO_PIN ?= datumaro==1.13.12
LS_STAMP := $(LS_VENV)/.installed-$(subst ==,-,$(LABEL_STUDIO_PIN))
DM_STAMP := $(DM_VENV)/.installed-$(subst ==,-,$(DATUMARO_PIN))

interop: $(LS_STAMP) $(DM_STAMP)

$(LS_STAMP):
	test -x $(LS_VENV)/bin/python || $(PYTHON) -m venv $(LS_VENV)
	$(LS_VENV)/bin/python -m pip install -q --upgrade pip
	$(LS_VENV)/bin/python -m pip install -q "$(LABEL_STUDIO_PIN)" "$(LABEL_STUDIO_CONSTRAINTS)"
	touch $@

$(DM_STAMP):
	test -x $(DM_VENV)/bin/python || $(PYTHON) -m venv $(DM_VENV)
	$(DM_VENV)/bin/python -m pip install -q "$(DATUMARO_PIN)"
	touch $@

test: $(STAMP) $(LS_STAMP) $(DM_STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/aax demo --out demo-run

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_annotate.py --out benchmarks/results

# The documentation site, API reference included, into site/ (git-ignored); --strict
# fails on a broken link, a missing page or a docstring the reference cannot render.
docs: $(STAMP)
	$(BIN)/python -m mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) $(LS_VENV) $(DM_VENV) demo-run site .pytest_cache
