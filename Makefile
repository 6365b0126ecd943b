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

.PHONY: install pretrain run lint format test test-fast viz notebook mlflow-ui clean

install: $(STAMP)

# The project pins Python 3.11 (pyproject.toml requires-python): stop before creating anything with another one.
PY_CHECK := import sys; v = sys.version_info; sys.exit(0 if v[:2] == (3, 11) else \
	f"eva_pipeline needs Python 3.11, {sys.executable} is {v[0]}.{v[1]}: run make with PYTHON=python3.11 " \
	"(and remove $(VENV) if it was made with another Python)")

# Re-install only when the dependency declaration changes.
$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "eva_pipeline needs Python 3.11: '$(PYTHON)' not found; run make with PYTHON=python3.11"; exit 1; }
	@test -x $(BIN)/python && $(BIN)/python -c '$(PY_CHECK)' || $(PYTHON) -c '$(PY_CHECK)'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

pretrain: $(STAMP)
	$(BIN)/kedro run --pipelines pretrain

# The whole DAG: pre-training, then the two fine-tune stages and the classification table.
run: $(STAMP)
	$(BIN)/kedro run

# Layers (import-linter), lint and format (ruff), notebooks without outputs: the checks `make test` runs first.
lint: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/nbstripout --verify notebooks/*.ipynb

# Apply ruff's safe fixes and formatting in place; strip the notebooks' outputs.
format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .
	$(BIN)/nbstripout notebooks/*.ipynb

test: lint
	$(BIN)/python -m pytest

# The edit-test loop: everything but the tests marked slow (multi-process launches, SIGKILL restarts, whole
# sessions), spread over the cores by pytest-xdist. `make test` and .ci/run still run everything, in one process.
test-fast: lint
	$(BIN)/python -m pytest -m "not slow" -q -n auto

# A static site of every pipeline in build/, built offline; a browser needs it served (file:// cannot load its data).
viz: $(STAMP)
	$(BIN)/kedro viz build
	@echo "Serve it: $(BIN)/python -m http.server -d build --bind 127.0.0.1 4141, then open http://127.0.0.1:4141"

# JupyterLab on notebooks/ (explore_run.ipynb explores a finished run), served on this machine only and fetching
# nothing (no news, update checks or extension index); e.g. JUPYTER_ARGS="--no-browser --allow-root" in a container.
JUPYTER_ARGS ?=
notebook: $(STAMP)
	$(BIN)/jupyter lab --ServerApp.root_dir=notebooks --ServerApp.ip=127.0.0.1 --LabApp.news_url=None \
		--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate --LabApp.extension_manager=readonly \
		$(JUPYTER_ARGS)

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
