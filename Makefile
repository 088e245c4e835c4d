# The two commands of the README: `make run` and `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PIP     := $(BIN)/pip
export HARNESS_SHARED ?= $(abspath ../shared)

.PHONY: run test install clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip "setuptools<81" wheel
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# The main job: the shipped digits CNN, undefended, under a preprocessor-blind PGD attack.
run: $(STAMP)
	$(BIN)/harness run --defense none --threat preprocessor-blind

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 tests

clean:
	rm -rf $(VENV) results.db
