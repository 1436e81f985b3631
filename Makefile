# `make demo` and `make test` set everything up themselves on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= demo_out
# configs/demo.py preset: "" (about 20 minutes here) or "long" (about an hour on 2 CPU cores, minutes on a GPU).
DEMO_PRESET ?=
PYTEST_ARGS ?=
# The reference implementation of `make bench` lives in its own venv (bench/reference_requirements.txt says what).
REF_VENV ?= .venv-ref
REF_PY := $(REF_VENV)/bin/python
BENCH_ARGS ?=
# `make bench-gpu` installs jax for this accelerator: cuda (NVIDIA GPUs) or tpu.
ACCELERATOR ?= cuda

.PHONY: venv venv-dev demo lora-demo test bench bench-gpu clean

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
	$(PY) -m launch.demo --config=configs/demo.py:$(DEMO_PRESET) --workdir=$(DEMO_DIR)

# After `make demo`, in the same folder: a DiT that never heard drums learns them from a LoRA (configs/demo.py).
lora-demo: $(VENV)/.installed
	$(PY) -m launch.demo --config=configs/demo.py:lora --workdir=$(DEMO_DIR)

test: $(VENV)/.installed-dev
	$(PY) -m pytest -q $(PYTEST_ARGS)

$(REF_PY):
	$(PYTHON) -m venv $(REF_VENV)
	$(REF_PY) -m pip install --quiet --upgrade pip setuptools wheel

$(REF_VENV)/.installed: bench/reference_requirements.txt tests/reference/requirements.txt | $(REF_PY)
	$(REF_PY) -m pip install --quiet -r bench/reference_requirements.txt
	$(REF_PY) -m pip install --quiet --no-deps -r tests/reference/requirements.txt
	$(REF_PY) tests/reference/strip_cuda_extensions.py
	touch $@

# CPU table, musicdiff vs stable-audio-tools: bench/results/<host>-<date>.{json,md}. BENCH_ARGS=--quick for a fast
# development pass (small shapes, not a result).
bench: $(VENV)/.installed $(REF_VENV)/.installed
	$(PY) -m bench.run_all --reference_python=$(REF_PY) $(BENCH_ARGS)

$(VENV)/.installed-$(ACCELERATOR): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[$(ACCELERATOR)]'
	touch $@ $(VENV)/.installed

# Accelerator rows on one GPU/TPU device (bf16): bench/results/accelerator-<device>-<host>-<date>.{json,md}.
bench-gpu: $(VENV)/.installed-$(ACCELERATOR)
	$(PY) -m bench.accelerator $(BENCH_ARGS)

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
