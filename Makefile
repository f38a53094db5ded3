# ViT Lab: `make run` runs the course, `make test` tests it. Both set everything up first.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROFILE ?= smoke
NB ?=
JOBS ?= 2
export PYTHONHASHSEED := 0

.PHONY: help setup run test test-unit test-notebooks notebooks lab bench clean

help:
	@echo "make run   [PROFILE=smoke|cpu|gpu] [NB=notebooks/...ipynb]  run the course headless into build/"
	@echo "make test                                                  unit tests + nbval over every notebook"
	@echo "make lab                                                   JupyterLab with the project's kernel"
	@echo "make notebooks [PROFILE=cpu] [NB=...]                      re-execute notebooks in place (committed outputs)"
	@echo "make bench                                                 CPU train-step benchmark (and kernels on CUDA)"

# Exact pins come from environment.yml (the same list as pyproject.toml's ranges).
$(STAMP): pyproject.toml environment.yml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@mkdir -p build && sed -n 's/^ *- \([A-Za-z0-9_.-]*==[^ ]*\)$$/\1/p' environment.yml > build/constraints.txt
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -c build/constraints.txt -e '.[dev]'
	$(PY) -m ipykernel install --sys-prefix --name vitlab --display-name "ViT Lab (.venv)" > /dev/null
	@touch $@

setup: $(STAMP)

run: $(STAMP)
	$(PY) -m vitlab.course run --profile $(PROFILE) $(if $(NB),--nb $(NB)) --out build

notebooks: $(STAMP)
	$(PY) -m vitlab.course run --profile $(if $(filter smoke,$(PROFILE)),cpu,$(PROFILE)) $(if $(NB),--nb $(NB)) --inplace

# One thread per pytest worker: JOBS workers × 2 OpenMP threads on 2 cores spin-wait each other (10× slower).
test: $(STAMP)
	VITLAB_PROFILE=smoke OMP_NUM_THREADS=1 $(PY) -m pytest tests notebooks --nbval-lax --nbval-current-env -n $(JOBS) --dist loadfile \
		--durations=15 -q

test-unit: $(STAMP)
	VITLAB_PROFILE=smoke OMP_NUM_THREADS=1 $(PY) -m pytest tests -n $(JOBS) --dist loadfile --durations=15 -q

test-notebooks: $(STAMP)
	VITLAB_PROFILE=smoke OMP_NUM_THREADS=1 $(PY) -m pytest notebooks --nbval-lax --nbval-current-env -n $(JOBS) --dist loadfile -q

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks

bench: $(STAMP)
	$(PY) benchmarks/cpu_train_step.py
	$(PY) benchmarks/kernels.py --quick

clean:
	rm -rf build
