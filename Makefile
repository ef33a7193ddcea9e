# Thin wrappers so every command runs inside the project's virtual environment.
VENV ?= .venv
PYTHON ?= python3
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup repro paper test lint bench tune ui

setup:  ## create .venv and install the package with its dev tools
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(VENV)/bin/pip install --quiet -e ".[dev]"

repro:  ## the quick run: every stage, offline, ~15 min on 2 CPU cores
	dvc repro

# The paper's schedule: 224 px, 30 epochs, all of TEST (hours on a CPU; see README for costs).
PAPER_SCALE = -S prepare.image_size=224 -S train.epochs=30 -S evaluate.max_per_class=null

paper:  ## the full paper-scale study as a named DVC experiment
	dvc exp run -n paper-scale $(PAPER_SCALE)

tune:  ## Optuna search over train.lr / train.head_lr_factor (tune/dvc.yaml; not in `repro`)
	dvc repro tune/dvc.yaml
	wbc-transfer tune --apply

test:  ## the test suite
	pytest -q

lint:
	ruff check src tests bench

ui:  ## browse runs, curves, confusion matrices and the registry
	@python -c "from wbc_transfer import tracking; from wbc_transfer.config import load_params; \
	print('training runs:', tracking.ui_url(load_params(), 'http://127.0.0.1:5000'))"
	mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --port 5000
