# The two commands a newcomer needs (see README.md):
#   make demo   set up everything, then run the quick distillation and language model; print both tables
#   make test   set up everything, then run the test suite and the linter (ruff: pyproject.toml)
PY := .venv/bin/python
LINT := .venv/bin/ruff check src tests bench scripts

.PHONY: demo test lint setup data clean-venv

demo: setup
	.venv/bin/still demo

test: setup data
	$(PY) -m pytest -q
	$(LINT)

lint: setup
	$(LINT)

setup: .venv/.still-ready

.venv/.still-ready: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $@

data: setup
	.venv/bin/still data fetch mnist
	.venv/bin/still data fetch shakespeare

clean-venv:
	rm -rf .venv
