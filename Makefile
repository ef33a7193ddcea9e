# Thin wrappers so every command runs inside the project's virtual environment.
VENV ?= .venv
PYTHON ?= python3
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup repro paper best gpu test test-fast lint bench tune ui app server queue

setup:  ## create .venv and install the package with its dev tools
	test -x "$(VENV)/bin/python" || "$(PYTHON)" -m venv "$(VENV)"
	"$(VENV)/bin/pip" install --quiet --upgrade pip
	"$(VENV)/bin/pip" install --quiet torch==2.14.1 torchvision==0.29.1
	"$(VENV)/bin/pip" install --quiet -e ".[dev]"

repro:  ## the quick run: every stage, offline, EfficientNet-Lite0 (minutes on 2 CPU cores)
	dvc repro

# The paper's study: its four networks and EfficientNet-Lite0, ImageNet weights required (the
# `weights` stage stops before any training and names `wbc-transfer fetch-weights` when a file is
# missing), its recipe (SGD, lr 1e-4, head x10, batch 10), 224 px, 30 epochs, all of TEST; the
# published leaky 70/30 split and the same split by cell (hours on a CPU; docs/experiments.md).
PAPER_SCALE = -S 'train.architectures=[alexnet,googlenet,resnet50,vgg16,efficientnet_lite0]' \
	-S train.weights=imagenet -S 'train.protocols=[paper,paper_grouped]' -S train.recipe=paper \
	-S prepare.image_size=224 -S train.overrides=null -S train.epochs=30 -S train.batch_size=10 \
	-S train.lr=0.0001 -S train.head_lr_factor=10 -S evaluate.max_per_class=null

paper:  ## the full paper-scale study as a named DVC experiment
	dvc exp run -n paper-scale $(PAPER_SCALE)

# The best leak-free model: the tuned settings of the architecture that won on validation in
# results/tune/ (`make tune` on today's recipe; read by `wbc-transfer tune --apply --settings`, so
# a new study changes this target; today EfficientNet-Lite2, lr 0.003143, head x2.659, weight
# decay 0.0003511, augmentation x1.5) at the larger scale measured on the 2-core CPU before
# (docs/experiments.md): 192 px, 400 training images per class, 6 epochs, TTA, all of TEST.
# Promoted as the champion only if its validation score beats the current one.
TUNED = $(or $(shell PATH="$(PATH)" wbc-transfer tune --apply --settings),\
	$(error no tuned settings in results/tune/: run `make tune` first))
BEST = $(TUNED) -S 'train.protocols=[heldout,paper,paper_grouped]' -S prepare.image_size=192 \
	-S split.heldout.train_per_class=400 -S train.epochs=6 -S train.rotation_deg=180 \
	-S evaluate.tta=true -S evaluate.max_per_class=null

best:  ## train, evaluate and promote the best leak-free configuration (28 min on 2 CPU cores, bench/BEST.md)
	dvc exp run -n best-leak-free $(BEST)

# The paper-scale study and the best leak-free model on one CUDA GPU (docs/experiments.md):
# bf16 autocast, channels_last weights, the uint8 batches copied pinned and non-blocking.
# `make gpu GPU_DEVICE=cpu` is the same run on the CPU (bf16 autocast there too; hours).
GPU_DEVICE ?= cuda
GPU_FLAGS = -S train.device=$(GPU_DEVICE) -S train.amp=bf16 -S train.channels_last=true \
	-S evaluate.channels_last=true

gpu:  ## make paper + make best on one CUDA GPU, bf16 + channels_last (minutes on an H100)
	dvc exp run -n paper-scale-gpu $(PAPER_SCALE) $(GPU_FLAGS)
	dvc exp run -n best-gpu $(BEST) $(GPU_FLAGS)

tune:  ## Optuna search over train.lr, head_lr_factor, weight_decay, augmentation (tune/dvc.yaml; not in `repro`)
	dvc repro tune/dvc.yaml
	wbc-transfer tune --apply

# Two pytest-xdist workers, one test module each at a time (module fixtures built once): most of
# the suite waits on processes (DVC stages, servers, a browser), so two overlap on 2 cores.
TEST_WORKERS ?= 2
test:  ## the whole test suite, end-to-end tests through DVC, servers and a browser included
	pytest -q -n $(TEST_WORKERS) --dist loadfile

test-fast:  ## the suite without the tests marked slow (end to end: DVC, servers, signals)
	pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow"

lint:
	ruff check src tests bench

UI_HOST ?= 127.0.0.1
UI_PORT ?= 5000
ui:  ## browse runs, curves, confusion matrices and the registry (exit 1 if UI_PORT is taken)
	wbc-transfer ui --host "$(UI_HOST)" --port "$(UI_PORT)"

APP_ARGS ?=
app:  ## the page for lab staff at http://127.0.0.1:8765/ (docs/app.md; APP_ARGS="--port 9000 ...")
	wbc-transfer app $(APP_ARGS)

# Team setup (docs/team.md): one MLflow tracking server for the group, PostgreSQL store,
# artifacts proxied by the server. Set MLFLOW_BACKEND to the group's database URL.
MLFLOW_BACKEND ?= postgresql://mlflow@127.0.0.1:5432/mlflow
MLFLOW_ARTIFACTS ?= $(CURDIR)/mlflow-artifacts
MLFLOW_HOST ?= 127.0.0.1
MLFLOW_PORT ?= 5000

server:  ## the group's MLflow tracking server (bound to 127.0.0.1 unless MLFLOW_HOST says otherwise)
	python -c "import sys; from wbc_transfer.tracking import require_free_port as free; \
	free(sys.argv[1], int(sys.argv[2]), 'MLFLOW_PORT')" "$(MLFLOW_HOST)" "$(MLFLOW_PORT)"
	mlflow server --backend-store-uri "$(MLFLOW_BACKEND)" --serve-artifacts \
		--artifacts-destination "$(MLFLOW_ARTIFACTS)" --host "$(MLFLOW_HOST)" --port "$(MLFLOW_PORT)"

JOBS ?= 2
queue:  ## run the queued experiments (`dvc exp run --queue --allow-missing ...`), JOBS at a time
	WBC_PROCESSES=$(JOBS) dvc queue start -j $(JOBS)
