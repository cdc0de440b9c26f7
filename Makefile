# Two commands on a fresh machine: `make demo` and `make test`.
# Both create the virtualenv and install edgekit (with test extras) first.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
LITERT_NODEPS := litert-torch==0.10.0 litert-converter==0.5.0 xdsl==0.28.0

.PHONY: demo test test-fast bench install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	# litert-torch's own packages, without their conflicting typing-extensions pin (see pyproject's tflite extra)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps $(LITERT_NODEPS)
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/edgekit compress examples/recipes/quickstart.yaml --resume

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) runs
