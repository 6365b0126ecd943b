# Two commands a user needs: `make pretrain` (install + run the demo) and `make test` (install + tests);
# `make run` runs the whole DAG (pre-training, fine-tuning, the classification table).
# Both bootstrap a local virtual environment themselves; re-running is fast once installed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.eva-installed

# No network beyond package registries: keep telemetry of the tools off.
export KEDRO_DISABLE_TELEMETRY := 1
export DO_NOT_TRACK := 1
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
export HF_HUB_OFFLINE := 1
export PYTHONUNBUFFERED := 1

.PHONY: install pretrain run lint format test test-fast viz mlflow-ui clean

install: $(STAMP)

# Re-install only when the dependency declaration changes.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

pretrain: $(STAMP)
	$(BIN)/kedro run --pipelines pretrain

# The whole DAG: pre-training, then the two fine-tune stages and the classification table.
run: $(STAMP)
	$(BIN)/kedro run

# Layers (import-linter), lint and format (ruff): the checks `make test` runs before the tests.
lint: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Apply ruff's safe fixes and formatting in place.
format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint
	$(BIN)/python -m pytest

# The edit-test loop: everything but the tests marked slow (multi-process launches, SIGKILL restarts, whole
# sessions), spread over the cores by pytest-xdist. `make test` and .ci/run still run everything, in one process.
test-fast: lint
	$(BIN)/python -m pytest -m "not slow" -q -n auto

viz: $(STAMP)
	$(BIN)/kedro viz build

# MLflow 3.17's UI opens on GenAI traces unless told `workflowType=machine_learning` (then remembered): print the URL
# of the experiment's runs (its id read from the store; 1 on a fresh one).
mlflow-ui: $(STAMP)
	@$(BIN)/python -c "import os, sqlite3; \
	rows = os.path.exists('mlflow.db') and sqlite3.connect('mlflow.db').execute( \
	    \"select experiment_id from experiments where name = 'eva_pipeline'\").fetchall(); \
	print(f'Training runs: http://127.0.0.1:5000/#/experiments/{rows[0][0] if rows else 1}/runs?workflowType=machine_learning')"
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

clean:
	rm -rf build .pytest_cache
