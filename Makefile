# Set-up and entry points. `make demo` and `make test` each create the virtualenv when needed, from
# the committed lock of exact versions (requirements/lock-py311.txt), and check the result against it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
LOCK := requirements/lock-py311.txt
# The lock pins torch==2.13.0: on a CPU machine whose pip finds the CPU build on disk that is what it
# takes (seconds, no CUDA); elsewhere pip takes the registry's build of the same release. `make lock`
# and `make test-latest` install this torch first so that pip never resolves a bare `torch`
# (multi-GB CUDA build) on a CPU machine; the package itself asks only for a range (pyproject.toml).
TORCH_SPEC ?= torch==2.13.0
LATEST_VENV ?= .venv-latest

.PHONY: venv demo test lint bench lock test-latest evidence clean-demo

$(VENV)/.installed: pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r $(LOCK)
	$(PY) -m pip install -q --no-deps -e .
	$(PY) tools/lockfile.py check $(LOCK)
	touch $@

venv: $(VENV)/.installed

# The tiny recipe end to end on CPU: tiny random Qwen2-VL, synthetic shards, DVR training with PVC
# validation, W&B offline run; then check that run logged a validation with attention curves.
demo: venv
	$(PY) -m tvc_lightning.testing outputs/tiny/model
	test -d outputs/tiny/data/train || $(PY) -m data_engine synth --out outputs/tiny/data
	@# A fit refuses a checkpoint folder holding an earlier run's checkpoints; the demo starts afresh.
	rm -rf outputs/tiny/checkpoints
	$(PY) -m tvc_lightning fit --config recipes/tiny.yaml
	$(PY) tools/check_demo.py outputs/tiny

test: venv
	$(PY) -m pytest -q

lint: venv
	$(VENV)/bin/ruff check .

bench: venv
	$(PY) benchmarks/chunked_loss.py
	$(PY) benchmarks/pvc_decode.py
	$(PY) benchmarks/data_pipeline.py
	$(PY) benchmarks/train_throughput.py

# Re-resolve the lock: a fresh venv gets the newest versions pyproject.toml allows, and its exact
# versions become the lock. Run `make test` and `make demo` on the result before committing it.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q "$(TORCH_SPEC)"
	.venv-lock/bin/python -m pip install -q -e ".[dev]"
	.venv-lock/bin/python tools/lockfile.py freeze $(LOCK)
	rm -rf .venv-lock

# The suite on the newest versions pyproject.toml allows, in a separate venv; the lock is untouched.
# The versions it ran on are written to outputs/latest-versions.txt.
test-latest:
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade -e ".[dev]"
	mkdir -p outputs
	$(LATEST_VENV)/bin/python tools/lockfile.py freeze outputs/latest-versions.txt
	-diff $(LOCK) outputs/latest-versions.txt
	$(LATEST_VENV)/bin/python -m pytest -q

# Plain SFT vs DVR x plain vs PVC decoding on synth's late_lookup task, on CPU (~35 min on 2 cores):
# writes outputs/evidence/, docs/evidence.md and docs/evidence/uniform_*.png (VARIANT=survey,
# survey_qwen3vl, repeat, copy or arithmetic: docs/evidence_VARIANT.md, the other configurations
# tried). A rerun continues where it stopped; move outputs/evidence away to run another variant.
VARIANT ?= uniform
evidence: venv
	$(PY) -m tvc_lightning.analyze.evidence --variant $(VARIANT)

clean-demo:
	rm -rf outputs/tiny
