# Loopline developer entry points. `make help` lists them.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: help install demo test clean

help: ## List the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP) ## Create .venv and install Loopline with its test tools

demo: $(STAMP) ## The main job: embedded broker, example pipeline, ready
	$(BIN)/loopline demo

test: $(STAMP) ## The whole test suite (starts its own embedded broker)
	$(BIN)/python -m pytest

clean: ## Remove the virtual environment and local state
	rm -rf $(VENV) .loopline .pytest_cache
