# Set-up and entry points. `make demo` and `make test` each create the virtualenv when needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch first, pinned, so pip never resolves a plain `torch` to a multi-GB CUDA build on a CPU
# machine; the package itself only asks for a range (see pyproject.toml). Override on GPU boxes:
#   make TORCH_SPEC='torch==2.11.*' demo
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv demo test lint bench clean-demo

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

# The tiny recipe end to end on CPU: tiny random Qwen2-VL, synthetic shards, DVR training, W&B offline run.
demo: venv
	$(PY) -m tvc_lightning.testing outputs/tiny/model
	test -d outputs/tiny/data/train || $(PY) -m data_engine synth --out outputs/tiny/data
	$(PY) -m tvc_lightning fit --config recipes/tiny.yaml

test: venv
	$(PY) -m pytest -q

lint: venv
	$(VENV)/bin/ruff check .

bench: venv
	$(PY) benchmarks/chunked_loss.py
	$(PY) benchmarks/pvc_decode.py
	$(PY) benchmarks/data_pipeline.py

clean-demo:
	rm -rf outputs/tiny
