# The two commands of the README: `make run` and `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PIP     := $(BIN)/pip
# Tests that use real CIFAR data and checkpoints read them from $HARNESS_SHARED.
ifneq ($(wildcard ../shared/data),)
export HARNESS_SHARED ?= $(abspath ../shared)
endif

# OpenMP threads sleep at barriers instead of spinning (what `harness` itself sets): on a shared CPU a spinning
# thread waits for a partner that lost its core, and the tests ran 18 times slower with 2 threads (docs/benchmarks.md).
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: run test smoke docs install clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip "setuptools<81" wheel
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -e ".[test]"
	# torchattacks pins requests~=2.25.1, which would drag the resolver back to an old streamlit:
	# it is installed without its dependencies (it needs only torch, torchvision, scipy, numpy).
	$(PIP) install -q --no-deps torchattacks==3.5.1
	touch $(STAMP)

install: $(STAMP)

# The main job: the shipped digits CNN, undefended, under a preprocessor-blind PGD attack.
run: $(STAMP)
	$(BIN)/harness run --defense none --threat preprocessor-blind

# The whole suite: ruff (pyproject.toml [tool.ruff]), the strict documentation build (seconds),
# then the tests (they include the smoke grid and the regression check of its table). Chromium
# (the browser test) and the PostgreSQL server (tests against a real server) come from Debian's packages.
test: $(STAMP)
	$(BIN)/ruff check .
	$(MAKE) --no-print-directory docs
	sh dashboard/install_browser.sh
	sh tests/install_postgres.sh
	$(BIN)/python -m pytest -q -n 2 tests

# The smoke grid and its regression check alone (tests/test_smoke_grid.py runs the same).
SMOKE_DB ?= $(VENV)/smoke.db
smoke: $(STAMP)
	rm -f $(SMOKE_DB) $(SMOKE_DB)-wal $(SMOKE_DB)-shm
	$(BIN)/harness grid grids/smoke.yaml --db $(SMOKE_DB) --devices cpu,cpu --threads 1
	$(BIN)/harness check tables/smoke.csv --db $(SMOKE_DB)

# The manual as a site (mkdocs.yml): strict, so a broken link or anchor, a page left out of the nav
# or an API docstring it cannot render fails; into build/site.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

clean:
	rm -rf $(VENV) results.db
