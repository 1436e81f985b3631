# `make demo` and `make test` set everything up themselves on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= demo_out
PYTEST_ARGS ?=

.PHONY: venv venv-dev demo test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel

# Stamps re-run the install whenever pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e .
	touch $@

# The dev extra plus the stable-audio-tools reference of the converter's parity tests, pinned and installed without
# dependency resolution (tests/reference/requirements.txt says why).
$(VENV)/.installed-dev: pyproject.toml tests/reference/requirements.txt | $(PY)
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps -r tests/reference/requirements.txt
	$(PY) tests/reference/strip_cuda_extensions.py
	touch $@ $(VENV)/.installed

venv: $(VENV)/.installed
venv-dev: $(VENV)/.installed-dev

demo: $(VENV)/.installed
	$(PY) -m launch.demo --workdir=$(DEMO_DIR)

test: $(VENV)/.installed-dev
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(VENV)/.installed
	$(PY) -m bench.run_all

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
