# Two entry points do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
STAMP := .venv-stamp

$(STAMP): pyproject.toml
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m shardq demo

test: $(STAMP)
	$(PY) -m pytest -q tests

.PHONY: install demo test
