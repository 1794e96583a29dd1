# The README's commands. `make test` and `make demo` set themselves up on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
# Local Ray clusters here run without token auth (see README, "Ray auth").
export RAY_AUTH_MODE ?= disabled

.PHONY: setup test test-fast demo bench clean

setup: $(VENV)/.installed

# torch is pinned to the CPU wheel only here, through the constraints file.
$(VENV)/.installed: pyproject.toml constraints-cpu.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints-cpu.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints-cpu.txt -e ".[dev]"
	touch $@

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest

# The quick subset while developing: unit tests and the shared-Ray data tests, no training,
# pipeline or Serve start-ups (tests marked `slow`). CI runs the full `make test`.
test-fast: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -m "not slow"

# The main job on a local Ray: demo data -> preprocess -> stage 1 -> stage 2 -> eval -> export ->
# deploy + one request through the openai client; summary in runs/demo/summary.md.
demo: setup
	$(VENV)/bin/python workflows/pipeline.py --config workflows/configs/demo.yaml

bench: setup
	$(PY) benchmarks/preprocess.py
	$(PY) benchmarks/serve.py
	$(PY) benchmarks/train.py

clean:
	rm -rf $(VENV) runs benchmarks/out
