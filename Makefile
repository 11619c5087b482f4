# Two commands for a fresh clone: `make demo` (set-up, demo data, convert, train) and `make test`.
# Set-up is tools/bootstrap.sh: idempotent and quick when nothing changed.
PY := .venv/bin/python
export WANDB_MODE ?= offline
export PYTHONUNBUFFERED := 1

.PHONY: setup test demo clean

setup:
	@bash tools/bootstrap.sh

# 2 workers, whole files each: the suite waits on subprocesses and Slurm for a third of its time
# (tests/conftest.py orders the files); PYTEST_WORKERS=0 runs it in one process
PYTEST_WORKERS ?= 2

test: setup
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile tests

demo: setup
	$(PY) tools/demo.py

clean:
	rm -rf .venv runs data/demo .pytest_cache
