# Loopline developer entry points. `make help` lists them.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# mypy reads the package as installed: services/ is loopline.services, which no source folder
# spells, so lint links that layout here (mypy then names services/x.py loopline/services/x.py).
LINT_SRC := $(VENV)/lint-src

.PHONY: help install shell kafka demo lint test test-kafka clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-11s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP) ## Create .venv and install Loopline with its test tools

shell: $(STAMP) ## A shell with `loopline` on PATH (.venv active); `exit` leaves it
	@echo "loopline is on PATH in this shell ($(CURDIR)/$(BIN)); exit leaves it"
	@PATH="$(CURDIR)/$(BIN):$$PATH" VIRTUAL_ENV="$(CURDIR)/$(VENV)" $${SHELL:-/bin/sh} -i

kafka: $(STAMP) ## Fetch the kafka engine's Apache Kafka once (needs Java 17+ and Maven)
	$(BIN)/python -m loopline.brokers

demo: $(STAMP) ## The main job: embedded broker, example pipeline, ready
	$(BIN)/loopline demo

lint: $(STAMP) ## ruff (rules, line length) and mypy (strict on the core), as CI runs them
	$(BIN)/ruff check .
	@rm -rf $(LINT_SRC)/loopline && mkdir -p $(LINT_SRC)/loopline
	@for f in loopline/*; do ln -s "$(CURDIR)/$$f" $(LINT_SRC)/loopline/; done
	@ln -s "$(CURDIR)/services" $(LINT_SRC)/loopline/services
	@ln -s "$(CURDIR)/schemas" $(LINT_SRC)/loopline/schemas
	cd $(LINT_SRC) && "$(CURDIR)/$(BIN)/mypy" --config-file "$(CURDIR)/pyproject.toml" -p loopline

# Workers: the suite mostly waits (group joins, services starting), so more than the cores.
TEST_WORKERS ?= 4

test: $(STAMP) ## The whole test suite on the embedded Tansu broker it starts itself
	$(BIN)/python -m pytest -n $(TEST_WORKERS)

test-kafka: kafka ## The whole test suite again, on an Apache Kafka broker it starts itself
	LOOPLINE_TEST_ENGINE=kafka $(BIN)/python -m pytest -n $(TEST_WORKERS)

clean: ## Remove the virtual environment and local state
	rm -rf $(VENV) .loopline .pytest_cache
