# make demo  — install (first time) and run the main job on the embedded local default
# make test  — install (first time) and run the test suite
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel
	# torch + torchvision first, as a pair (they lie on local disk for Python 3.11)
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	# DeepSpeed: prebuild only the shm_comm op so deepspeed.initialize does not JIT-compile it;
	# --no-cache-dir because pip reuses a cached wheel whatever DS_BUILD_* says.
	$(BIN)/python -c "import deepspeed" 2>/dev/null || \
		DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 $(BIN)/pip install --quiet --no-cache-dir --no-build-isolation deepspeed==0.19.8
	$(BIN)/pip install --quiet -e '.[dev,eval]'
	# headless Chromium for the MLflow UI tests (Debian's; the tests skip, saying why, where it cannot be installed)
	command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "chromium not installed: tests/integration/test_mlflow_ui.py will skip its browser test"
	# PostgreSQL, MLflow's backend store as infra/mlflow deploys it (Debian's; the tests that need it skip, saying
	# why, where it cannot be installed)
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; } || \
		echo "postgresql not installed: the cluster-mode tests (tests/integration/test_cluster_mode.py) will skip"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/convllava demo --workdir work/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=40 tests

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/lint-imports

clean:
	rm -rf work .pytest_cache
