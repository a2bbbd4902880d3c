# `make run` sets everything up and starts the app; `make test` sets up the same and runs every test.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := $(CURDIR)/.venv
BIN := $(VENV)/bin
export ICH_VAR_DIR ?= $(CURDIR)/var
export PATH := $(BIN):$(PATH)
export ICH_HOST ?= 127.0.0.1
export ICH_PORT ?= 8000
SERVICES := $(CURDIR)/scripts/services.sh

.PHONY: help run test test-tools setup services migrate demo-passwords lint format stop clean demo-model demo-model-measure bench

REAL_DATA ?= $(abspath $(CURDIR)/../shared/data)
DEMO_RUN := $(ICH_VAR_DIR)/runs/ich-demo
DEMO_EVAL := $(ICH_VAR_DIR)/eval/ich-demo
# The shipped package: the trained ensemble with three strip readers, each fused for classes
# no other reader fuses: the convexity reader ("any", epidural), the sulcal reader
# (subarachnoid) and the crescent reader (subdural; its network is 6.8.0's, trained longer).
# 6.13.0 refits the sulcal reader's fusion in the "either" form on 360 more fit studies.
DEMO_CX_RUN := $(DEMO_RUN)-cx
DEMO_SULCAL_RUN := $(DEMO_RUN)-sulcal
DEMO_CX3_RUN := $(DEMO_RUN)-cx3
DEMO_MODEL_RUN := $(DEMO_RUN)-613
CX_FIT := --fit phantom:$(ICH_VAR_DIR)/data/cx-val --fit phantom:$(ICH_VAR_DIR)/data/cx-fit-typical

help:
	@echo "make run    install, start Postgres + Redis, migrate, seed demo users, start the app"
	@echo "make test   install, start Postgres + Redis, run lint, types and every test"
	@echo "make demo-passwords   give the demo users new passwords (printed once)"
	@echo "make clean  remove the virtualenv and var/ (database, media, logs)"

# The virtualenv is rebuilt only when pyproject.toml changes, so a second run starts in seconds.
$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) not found"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

migrate: setup
	@$(SERVICES) start $(ICH_VAR_DIR)/run/make-migrate.started
	$(BIN)/python manage.py migrate --noinput

run: setup
	@$(SERVICES) start $(ICH_VAR_DIR)/run/make-run.started
	@trap '$(SERVICES) stop $(ICH_VAR_DIR)/run/make-run.started' EXIT; \
	  trap 'exit 130' INT TERM; \
	  $(BIN)/python manage.py migrate --noinput && \
	  $(BIN)/python manage.py collectstatic --noinput --verbosity 0 && \
	  $(BIN)/python manage.py seed_demo_users && \
	  echo "" && \
	  echo "  ICH triage is starting at http://$(ICH_HOST):$(ICH_PORT)/  (Ctrl-C stops everything)" && \
	  echo "  Triage support, not diagnosis." && echo "" && \
	  $(BIN)/honcho start -f Procfile

demo-passwords: setup
	@$(SERVICES) start $(ICH_VAR_DIR)/run/make-demo.started
	@trap '$(SERVICES) stop $(ICH_VAR_DIR)/run/make-demo.started' EXIT; \
	  $(BIN)/python manage.py seed_demo_users --reset-passwords

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# DICOM peers the tests talk to (dcmtk's storescu, echoscu, storescp): Debian's dcmtk package.
test-tools:
	@command -v storescp >/dev/null && command -v dcmdump >/dev/null || { \
	  [ "$$(id -u)" = 0 ] || { echo "dcmtk is missing: apt-get install dcmtk"; exit 1; }; \
	  echo "installing dcmtk (Debian package)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dcmtk >/dev/null; }

# Tests use Redis database 1 so a running `make run` (database 0) never takes their tasks.
# scripts/test_lanes.py runs two pytest processes, one thread each: the training lane (the tiny
# training module, then the shipped-model and phantom modules) starts at once, and the main
# lane runs lint, the test tools' install and collectstatic meanwhile, then every other test.
# ICH_TEST_LANES=1 runs those first and then one pytest over everything. (A plain `make`, not $(MAKE): a line naming
# $(MAKE) would run even under `make -n`.)
test: setup
	@$(SERVICES) start $(ICH_VAR_DIR)/run/make-test.started
	@trap '$(SERVICES) stop $(ICH_VAR_DIR)/run/make-test.started' EXIT; \
	  export REDIS_URL=$${REDIS_URL:-redis://127.0.0.1:$${ICH_REDIS_PORT:-6390}/1}; \
	  $(BIN)/python scripts/test_lanes.py --first 'make --no-print-directory lint test-tools' \
	    --first '$(BIN)/python manage.py collectstatic --noinput --verbosity 0'

# The shipped demonstration model, trained and measured by one command (about 6 hours on 2 CPU
# cores, 16 GB of memory), in five stages (configs/demo-stage1.toml .. demo-stage4.toml: growing
# resolution; demo.toml: a fourth phantom set rich in subdural and epidural blood). Training data:
# 760 phantoms (four seeds) + roboflow-ich, then 1800 more for the strip readers and their
# fusions; evaluation: four test sets of 60 and 240 new phantoms (four more seeds), the
# roboflow-ich patients held out of training, and the four CQ500 studies.
demo-model: setup
	$(BIN)/ich phantom --out $(ICH_VAR_DIR)/data/phantom-train --studies 160 --seed 1
	$(BIN)/ich phantom --out $(ICH_VAR_DIR)/data/phantom-train-b --studies 200 --seed 2
	$(BIN)/ich phantom --out $(ICH_VAR_DIR)/data/phantom-train-c --studies 200 --seed 3
	$(BIN)/ich phantom --out $(ICH_VAR_DIR)/data/phantom-train-d --studies 200 --seed 4 \
	  --favour subdural,epidural
	$(BIN)/ich phantom --out $(ICH_VAR_DIR)/data/phantom-test --studies 60 --seed 1001
	$(BIN)/ich phantom --out $(ICH_VAR_DIR)/data/phantom-test-large --studies 240 --seed 1002
	$(BIN)/ich phantom --out $(ICH_VAR_DIR)/data/phantom-test-typical --studies 60 --seed 1003 \
	  --extra-axial typical
	$(BIN)/ich phantom --out $(ICH_VAR_DIR)/data/phantom-test-large-typical --studies 240 \
	  --seed 1004 --extra-axial typical
	$(BIN)/ich train --config configs/demo-stage1.toml --out $(DEMO_RUN)-stage1
	$(BIN)/ich train --config configs/demo-stage2.toml --out $(DEMO_RUN)-stage2 \
	  --init-from $(DEMO_RUN)-stage1/model.pt
	$(BIN)/ich train --config configs/demo-stage3.toml --out $(DEMO_RUN)-stage3 \
	  --init-from $(DEMO_RUN)-stage2/model.pt
	$(BIN)/ich train --config configs/demo-stage4.toml --out $(DEMO_RUN)-stage4 \
	  --init-from $(DEMO_RUN)-stage3/model.pt
	$(BIN)/ich train --config configs/demo.toml --out $(DEMO_RUN) \
	  --init-from $(DEMO_RUN)-stage4/model.pt
	$(BIN)/ich phantom --out $(ICH_VAR_DIR)/data/cx-train-classic --studies 300 --seed 61 \
	  --favour subdural,epidural
	$(BIN)/ich phantom --out $(ICH_VAR_DIR)/data/cx-train-typical --studies 300 --seed 62 \
	  --favour subdural,epidural --extra-axial typical
	$(BIN)/ich phantom --out $(ICH_VAR_DIR)/data/cx-val --studies 120 --seed 63
	$(BIN)/ich phantom --out $(ICH_VAR_DIR)/data/cx-fit-typical --studies 120 --seed 64 \
	  --extra-axial typical
	$(BIN)/ich convexity $(DEMO_RUN)/model.pt --train phantom:$(ICH_VAR_DIR)/data/cx-train-classic \
	  --train phantom:$(ICH_VAR_DIR)/data/cx-train-typical --fit phantom:$(ICH_VAR_DIR)/data/cx-val \
	  --fit phantom:$(ICH_VAR_DIR)/data/cx-fit-typical --out $(DEMO_CX_RUN) --version 6.5.0
	$(BIN)/ich phantom --out $(ICH_VAR_DIR)/data/sah-train --studies 300 --seed 65 \
	  --favour subarachnoid
	$(BIN)/ich convexity $(DEMO_CX_RUN)/model.pt --train phantom:$(ICH_VAR_DIR)/data/cx-train-classic \
	  --train phantom:$(ICH_VAR_DIR)/data/cx-train-typical --train phantom:$(ICH_VAR_DIR)/data/sah-train \
	  --fit phantom:$(ICH_VAR_DIR)/data/cx-val --fit phantom:$(ICH_VAR_DIR)/data/cx-fit-typical \
	  --reader sulcal --classes subarachnoid --out $(DEMO_SULCAL_RUN) --version 6.7.0
	$(BIN)/ich phantom --out $(ICH_VAR_DIR)/data/cx-train-typical2 --studies 300 --seed 66 \
	  --favour subdural,epidural --extra-axial typical
	$(BIN)/ich convexity $(DEMO_SULCAL_RUN)/model.pt --train phantom:$(ICH_VAR_DIR)/data/cx-train-classic \
	  --train phantom:$(ICH_VAR_DIR)/data/cx-train-typical --train phantom:$(ICH_VAR_DIR)/data/cx-train-typical2 \
	  $(CX_FIT) --steps 300 --out $(DEMO_CX3_RUN) --version 6.8.0
	$(BIN)/ich convexity $(DEMO_SULCAL_RUN)/model.pt --net-from $(DEMO_SULCAL_RUN)/model.pt:convexity \
	  --fuse any,epidural $(CX_FIT) --out $(DEMO_RUN)-69a --version 6.9.0-a
	$(BIN)/ich convexity $(DEMO_RUN)-69a/model.pt --reader crescent \
	  --net-from $(DEMO_CX3_RUN)/model.pt:convexity --fuse subdural $(CX_FIT) \
	  --out $(DEMO_RUN)-69 --version 6.9.0
	$(BIN)/ich phantom --out $(ICH_VAR_DIR)/data/sah-fit-classic --studies 180 --seed 72 \
	  --favour subarachnoid
	$(BIN)/ich phantom --out $(ICH_VAR_DIR)/data/sah-fit-typical --studies 180 --seed 73 \
	  --favour subarachnoid --extra-axial typical
	$(BIN)/ich convexity $(DEMO_RUN)-69/model.pt --reader sulcal \
	  --net-from $(DEMO_RUN)-69/model.pt:sulcal --fuse subarachnoid --either $(CX_FIT) \
	  --fit phantom:$(ICH_VAR_DIR)/data/sah-fit-classic --fit phantom:$(ICH_VAR_DIR)/data/sah-fit-typical \
	  --out $(DEMO_MODEL_RUN) --version 6.13.0
	$(MAKE) demo-model-measure

# Measures the trained run on the held-out data and copies it, its reports and card to models/.
demo-model-measure: setup
	$(BIN)/ich evaluate $(DEMO_MODEL_RUN)/model.pt $(ICH_VAR_DIR)/data/phantom-test --kind phantom \
	  --out $(DEMO_EVAL)/phantom --title "60 held-out phantom studies (seed 1001)"
	$(BIN)/ich evaluate $(DEMO_MODEL_RUN)/model.pt $(ICH_VAR_DIR)/data/phantom-test-large --kind phantom \
	  --out $(DEMO_EVAL)/phantom-large --title "240 held-out phantom studies (seed 1002)"
	$(BIN)/ich evaluate $(DEMO_MODEL_RUN)/model.pt $(ICH_VAR_DIR)/data/phantom-test-typical --kind phantom \
	  --out $(DEMO_EVAL)/phantom-typical --title "60 held-out phantom studies, typical shapes (seed 1003)"
	$(BIN)/ich evaluate $(DEMO_MODEL_RUN)/model.pt $(ICH_VAR_DIR)/data/phantom-test-large-typical \
	  --kind phantom --out $(DEMO_EVAL)/phantom-large-typical \
	  --title "240 held-out phantom studies, typical shapes (seed 1004)"
	$(BIN)/ich evaluate $(DEMO_MODEL_RUN)/model.pt $(REAL_DATA)/roboflow-ich --kind yolo \
	  --out $(DEMO_EVAL)/roboflow --title "roboflow-ich slices of held-out patients" \
	  --note "Real CT, windowed 8-bit slices (CC BY 4.0); patients in the model's test split only."
	$(BIN)/ich evaluate $(DEMO_MODEL_RUN)/model.pt $(REAL_DATA)/cq500 --kind study_folder \
	  --out $(DEMO_EVAL)/cq500 --title "the 4 CQ500 studies in shared/data" \
	  --note "Real CT (CC BY-NC-SA 4.0). Four studies measure nothing statistically."
	mkdir -p models/ich-demo
	cp $(DEMO_MODEL_RUN)/model.pt models/ich-demo/model.pt
	cp $(DEMO_EVAL)/phantom/report.json models/ich-demo/eval-phantom.json
	cp $(DEMO_EVAL)/phantom-large/report.json models/ich-demo/eval-phantom-large.json
	cp $(DEMO_EVAL)/phantom-typical/report.json models/ich-demo/eval-phantom-typical.json
	cp $(DEMO_EVAL)/phantom-large-typical/report.json models/ich-demo/eval-phantom-large-typical.json
	cp $(DEMO_EVAL)/roboflow/report.json models/ich-demo/eval-roboflow.json
	cp $(DEMO_EVAL)/cq500/report.json models/ich-demo/eval-cq500.json
	cp $(DEMO_EVAL)/phantom/roc_study.png models/ich-demo/roc-phantom.png
	$(BIN)/ich card models/ich-demo/model.pt models/ich-demo/eval-phantom.json \
	  models/ich-demo/eval-phantom-large.json models/ich-demo/eval-phantom-typical.json \
	  models/ich-demo/eval-phantom-large-typical.json models/ich-demo/eval-roboflow.json \
	  models/ich-demo/eval-cq500.json --out models/ich-demo/MODEL_CARD.md

bench: setup
	$(BIN)/python bench/inference.py

clean:
	-$(SERVICES) stop $(ICH_VAR_DIR)/run/make-run.started
	rm -rf $(VENV) $(ICH_VAR_DIR)
