# Two commands for a newcomer:  make quickstart   |   make test
# PYTHON picks the interpreter for the virtualenv (default: python3 on PATH).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/quickstart
PYTEST_ARGS ?=

.PHONY: setup quickstart test bench clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@$(PY) -c "import jax, flax, sys; print('[moejax] python', sys.version.split()[0], 'jax', jax.__version__, 'flax', flax.__version__)"
	touch $@

setup: $(VENV)/.installed

quickstart: setup
	$(PY) -m moejax.train --config configs/quickstart.py --workdir $(WORKDIR)
	$(PY) -m moejax.generate --workdir $(WORKDIR) --prompt "def " --max_new_tokens 120

test: setup
	$(PY) -m pytest -q -n 2 --durations=15 $(PYTEST_ARGS) tests

bench: setup
	$(PY) benchmarks/train_step.py

clean:
	rm -rf $(VENV) runs .pytest_cache
