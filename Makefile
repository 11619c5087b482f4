# Two commands for a fresh clone: `make demo` (set-up, demo data, convert, train) and `make test`.
# Set-up is tools/bootstrap.sh: idempotent and quick when nothing changed.
PY := .venv/bin/python
export WANDB_MODE ?= offline
export PYTHONUNBUFFERED := 1

.PHONY: setup test demo clean

setup:
	@bash tools/bootstrap.sh

test: setup
	$(PY) -m pytest -q tests

demo: setup
	$(PY) tools/demo.py

clean:
	rm -rf .venv runs data/demo .pytest_cache
