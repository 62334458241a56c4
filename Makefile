# Two commands for a fresh machine: `make demo` and `make test`.
# Each creates .venv on first use: torch==2.13.0 (CPU build) first, then pdserve with its test extras.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.pdserve-installed

.PHONY: demo test test-slow lint proto clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/pdserve demo

test: $(STAMP)
	$(PY) -m pytest -q -ra -m "not slow" tests

test-slow: $(STAMP)  # pytest exits 5 when no test is marked slow: that is a pass here
	$(PY) -m pytest -q -ra -m slow tests; rc=$$?; test $$rc -eq 0 -o $$rc -eq 5

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

proto: $(STAMP)
	$(PY) proto/generate.py

clean:
	rm -rf $(VENV) build *.egg-info
