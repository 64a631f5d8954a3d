# Two commands on a fresh machine:  make run NAME=Alice   and   make test
VENV ?= .venv
PY := $(VENV)/bin/python
NAME ?= Alice
OUT ?= out

.PHONY: setup run test test-fast browser gguf

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The local CPU build of torch first: a plain `torch` requirement would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# llama.cpp's Python bindings (selfcog[gguf]), compiled from source: export-gguf's k-quants and its llama.cpp check;
# `make test` then runs the llama.cpp tests too (they are skipped without it).
gguf: setup
	$(PY) -m pip install -q -e '.[test,gguf]'

run: setup
	$(VENV)/bin/selfcog run --name "$(NAME)" --out "$(OUT)"

# Debian's chromium for the browser tests (no browser download is possible here) and a CJK font (the studio test
# checks that Chinese is drawn); best effort outside root.
browser:
	@{ command -v chromium >/dev/null 2>&1 && [ -n "$$(fc-list :lang=zh 2>/dev/null)" ]; } || { [ "$$(id -u)" = 0 ] && (apt-get update -q && apt-get install -y -q chromium fonts-noto-cjk) >/dev/null 2>&1 || echo "chromium or fonts-noto-cjk not installed: the browser tests are skipped or fail their Chinese check"; }

test: setup browser
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not browser and not distributed"
