# Set-up and the two everyday jobs. Everything installs into .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch and torchvision are pinned to a pair that installs together (CPU and CUDA).
TORCH ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test lint man bench-plan bench-quality bench-quick bench-speed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test]"
	# basicsr ships the published NIQE model parameters; only its data file is used, so its
	# own (heavy, conflicting) requirements are not installed.
	$(PY) -m pip install -q --no-deps "basicsr==1.4.2"
	touch $@

## demo: restore the example photos in examples/ into restored/ with the shipped model
demo: $(VENV)/.installed
	$(VENV)/bin/fape restore examples/ -o restored/

## test: run the test suite (CPU, a few minutes)
test: $(VENV)/.installed
	$(PY) -m pytest -n 2 -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check fapecli tests bench

## man: regenerate man/ from the CLI
man: $(VENV)/.installed
	$(PY) -m fapecli.manpages man

$(VENV)/.bench: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[bench]"
	touch $@

## benchmarks (they read ../shared/data; tables go to bench/results/)
bench-plan: $(VENV)/.installed
	$(PY) bench/plan_accuracy.py --data ../shared/data

# every image; classical scores reused from the committed report (58 min to recompute)
bench-quality: $(VENV)/.bench
	$(PY) bench/quality.py --data ../shared/data --ensemble --cache-from bench/results/quality.json

# the first 4 images per set; classical scores reused from the committed report
bench-quick: $(VENV)/.bench
	$(PY) bench/quality.py --data ../shared/data --limit 4 --ensemble \
		--cache-from bench/results/quality-quick.json --out bench/results/quality-quick.md

bench-speed: $(VENV)/.installed
	$(PY) bench/speed.py --model fape-s --sizes 1,24 --threads 2
