"""Shared helpers: tiny data files and configs written by the tests themselves."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

from snugtune.config import Config, DataConfig, config_from_dict
from snugtune.data.prepare import prepare_data
from snugtune.models.load import load_base_model, load_tokenizer, prepare_for_training
from snugtune.models.resolve import resolve_model
from snugtune.precision import Precision

# xdist workers share the cores: each worker, and every process a test starts (it inherits the environment),
# gets its share of threads; 2 workers x 2 threads on 2 cores made gloo ranks and trainings wait on each other
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    THREADS = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(THREADS)
    torch.set_num_threads(THREADS)

# files xdist hands out first (`make test-slow` keeps collection order): the slow stage's longest test, the DPO demo
# on the embedded model (~3.5 min on one thread), which xdist's largest-file-first order otherwise left to run alone last
LONGEST_FIRST = ("tests/test_examples.py",)


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: item.nodeid.split("::")[0] not in LONGEST_FIRST)  # stable: the rest keep their order


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def alpaca_rows(n: int = 40, seed: int = 0) -> list[dict]:
    """Arithmetic question/answer pairs of varying length: learnable in a few steps."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        pad = " Please answer carefully." * rng.randint(0, 3)
        rows.append({"instruction": f"Add {a} and {b}.{pad}", "input": "", "output": f"The sum is {a + b}."})
    return rows


def pair_rows(n: int = 40, seed: int = 0) -> list[dict]:
    """Preference pairs (TRL's prompt/chosen/rejected) on arithmetic: the right sum against a wrong, hedged one."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        rows.append({"prompt": f"Add {a} and {b}.", "chosen": f"The sum is {a + b}.",
                     "rejected": f"I think it is {a + b + rng.randint(1, 9)}, maybe."})
    return rows


@pytest.fixture
def pairs_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "pairs.jsonl", pair_rows())


@pytest.fixture
def alpaca_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "alpaca.jsonl", alpaca_rows())


def tiny_config(tmp_path: Path, data_path: Path, **sections) -> Config:
    """A shape:tiny config writing into tmp_path/run; keyword sections override the defaults. fp32, not auto
    (bf16 on a CPU that has it): the same numbers on every CPU, and paths compared to fp32 rounding."""
    raw = {"model": "shape:tiny", "data": {"path": str(data_path), "eval_fraction": 0.1}, "max_seq_len": 96,
           "method": "lora", "lora": {"r": 4, "alpha": 8, "targets": "all-linear"},
           "train": {"max_steps": 3, "micro_batch": 4, "lr": 1e-2, "seed": 0, "precision": "fp32"},
           "save": {"every_steps": 100}, "output_dir": str(tmp_path / "run"), "device": "cpu"}
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return config_from_dict(raw)


REPO_ROOT = Path(__file__).resolve().parent.parent  # the checkout: examples/, docs/
EXAMPLES_DIR = REPO_ROOT / "examples"
FP32 = Precision("fp32", "cpu")
CPU = torch.device("cpu")


def tiny_model(tmp_path: Path, data_file: Path, **sections):
    """(config, model ready to train on the CPU in fp32, tokenizer, prepared data) for tiny_config(...)."""
    cfg = tiny_config(tmp_path, data_file, **sections)
    path = resolve_model(cfg.model).path
    tokenizer = load_tokenizer(path)
    data = prepare_data(cfg.data, tokenizer, cfg.max_seq_len, 0)
    torch.manual_seed(0)
    model = prepare_for_training(load_base_model(path, cfg, CPU, torch.float32), cfg)
    return cfg, model, tokenizer, data


def trainable_grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2's tokenizer (ChatML template, ChatML tokens in its vocabulary), as shape models use it."""
    return load_tokenizer(resolve_model("shape:tiny").path)


def trained_text(sample, tokenizer) -> str:
    """The tokens of a tokenized sample that the loss covers, decoded."""
    from snugtune.data.tokenize import IGNORE
    return tokenizer.decode([t for t, lab in zip(sample.input_ids, sample.labels) if lab != IGNORE])


def prepare(tokenizer, path, max_seq_len: int = 256, **data):
    """prepare_data on a file with no held-out split."""
    return prepare_data(DataConfig(path=str(path), **{"eval_fraction": 0.0, **data}), tokenizer, max_seq_len, 0)


@pytest.fixture(scope="module")
def tiny_llama_inventory():
    """The planner's inventory of a two-block Llama small enough to check by hand."""
    from transformers import LlamaConfig
    from snugtune.planner.inventory import inventory_from_config
    return inventory_from_config(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=1000,
                                             tie_word_embeddings=False))


def cpu_decisions(config: Config):
    """What the planner decides for `config` on the CPU without a card (the engine executes these)."""
    from snugtune.planner.apply import plan_without_card
    from snugtune.planner.inventory import inventory_for
    return plan_without_card(config, inventory_for(config)).decisions


def planner_decisions(**changes):
    """Planner Decisions for tiny_llama_inventory: QLoRA r=4 on all seven linears, 2 x 100 tokens, checkpointed;
    LoRA layers fused where memory_rules.fuses_lora fuses them (unless `changes` say)."""
    from snugtune.memory_rules import fuses_lora
    from snugtune.methods import METHODS
    from snugtune.planner.plan import Decisions
    base = dict(method="qlora", lora_r=4, lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                         "up_proj", "down_proj"),
                lora_last_layers=None, double_quant=True, optimizer="adamw", compute_bytes=2, micro_batch=2,
                max_seq_len=100, grad_checkpointing=True)
    method = METHODS[changes.get("method", base["method"])]
    return Decisions(**{**base, "fused_lora": fuses_lora(method.adapters, method.base_bits), **changes})

@pytest.fixture(scope="session")
def finished_run(tmp_path_factory) -> Path:
    """A finished tiny LoRA run (2 steps, a checkpoint each step, keep 1); copy it before changing it."""
    from snugtune.engine.train import train
    tmp = tmp_path_factory.mktemp("finished")
    data = write_jsonl(tmp / "a.jsonl", alpaca_rows(24))
    cfg = tiny_config(tmp, data, train={"max_steps": 2}, save={"every_steps": 1, "keep": 1})
    train(cfg, show_progress=False)
    return Path(cfg.output_dir)


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory):
    """A finished 4-step QLoRA run on shape:tiny (once per test module)."""
    from snugtune.engine.train import train
    tmp = tmp_path_factory.mktemp("qlora-run")
    data = write_jsonl(tmp / "a.jsonl", alpaca_rows(32))
    cfg = tiny_config(tmp, data, method="qlora", train={"max_steps": 4, "lr": 2e-2})
    train(cfg, show_progress=False)
    return Path(cfg.output_dir)


def logits_of(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()
