"""Data parallelism on CPU: two gloo processes (DDP and FSDP, eager and on the fast path: fused LoRA layers and
compiled blocks) against one process at the same rows per step.

The two-process runs share one process group (tests/engine/distributed_worker.py trains them in turn), so the
group starts once; the one-process references run in this process meanwhile.
"""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import alpaca_rows, write_jsonl
from gloo_ranks import adapter_gap, assert_trains_like, finish, spawn, tiny_run
from snugtune.config import config_from_dict
from snugtune.engine.distributed import DistContext, context_from_env, step_share
from snugtune.engine.train import train

WORKER = Path(__file__).with_name("distributed_worker.py")
# rows left for an epoch's last step of 8 (2 processes x micro 2 x accumulation 2): every residue under FSDP
# (where unmatched micro-batch counts hang the all-gathers), and under DDP the two where rank 1 is short of a
# micro-batch (1 and 5: it runs a zero-weight one)
TAILS = {"fsdp": range(1, 8), "ddp": (1, 5)}
# (method, precision, blocks compiled (with checkpointing, on both sides), relative tolerance on step 1's
# gradients, grad norms and losses, then on later steps' gradients). Every run fuses its LoRA layers.
# fp16: rounding in another summation order (measured 3e-4 on step 1's gradients), after which the weights
# drift apart through Adam (2e-3 by step 4); docs/distributed.md has the measured table. Compiled: each
# process compiles its own blocks with inductor (gcc on the CPU), the fast path of every GPU process.
WHOLE_RUNS = {"ddp_checkpointing": ("lora", "fp32", False, 1e-5, 1e-5),
              "fsdp_lora": ("lora", "fp32", False, 1e-5, 1e-5),
              "fsdp_qlora": ("qlora", "fp32", False, 1e-5, 1e-5),
              "fsdp_qlora_fp16": ("qlora", "fp16", False, 1e-3, 5e-3),
              "ddp_compiled": ("lora", "fp32", True, 1e-5, 1e-5),
              "fsdp_qlora_compiled": ("qlora", "fp32", True, 1e-5, 1e-5)}


def _cases(root: Path) -> tuple[dict[str, dict], dict[str, dict]]:
    """(two-process runs, one-process references); a two-process run `x_name` compares with reference `name`."""
    two, one = {}, {}
    for tail in TAILS["fsdp"]:  # one full step, then the tail
        data = write_jsonl(root / f"tail{tail}.jsonl", alpaca_rows(8 + tail))
        one[f"tail{tail}"] = tiny_run(data, root / f"one_tail{tail}", grad_accum=4)
        for parallel in (p for p, tails in TAILS.items() if tail in tails):
            two[f"{parallel}_tail{tail}"] = tiny_run(data, root / f"{parallel}_tail{tail}", grad_accum=2,
                                                 data_parallel=parallel)
    data = write_jsonl(root / "whole.jsonl", alpaca_rows(48))
    for name, (method, precision, compiled, *_) in WHOLE_RUNS.items():
        # aot_eager: the same traced blocks and backward around DDP's and FSDP's hooks, without gcc's minutes
        fast = {"compile": True, "compile_backend": "aot_eager", "grad_checkpointing": True} if compiled else {}
        if compiled and name.startswith("ddp"):  # the first block recomputed, the second not (2 x T4's plan)
            fast["checkpoint_layers"] = 1
        one[_reference(name)] = tiny_run(data, root / f"one_{_reference(name)}", method, precision, max_steps=4,
                                         grad_accum=2, **fast)
        two[name] = tiny_run(data, root / name, method, precision, max_steps=4, grad_accum=1,
                             data_parallel=name.split("_")[0],
                             **{"grad_checkpointing": name == "ddp_checkpointing", **fast})
        if compiled:  # and held-out rows: 10 in 5 batches, 3 scored by rank 0 and 2 by rank 1
            for raw in (one[_reference(name)], two[name]):
                raw["data"]["eval_fraction"], raw["eval"] = 0.2, {"batch_size": 2}
    return two, one


def _reference(name: str) -> str:
    """The one-process run that two-process run `name` of WHOLE_RUNS is compared with."""
    method, precision, compiled, *_ = WHOLE_RUNS[name]
    return f"{method}_{precision}" + ("_compiled" if compiled else "")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gloo")
    two, one = _cases(root)
    spec = root / "two.json"
    spec.write_text(json.dumps(list(two.values())))
    group = spawn([sys.executable, str(WORKER), str(spec)])
    try:
        for raw in one.values():
            train(config_from_dict(raw), show_progress=False)
    finally:
        results = finish(group)
    for status, stderr in results:
        assert status == 0, stderr[-3000:]
    return root


@pytest.mark.parametrize("processes, micro_batch, grad_accum", [(2, 2, 8), (2, 2, 2), (2, 1, 4), (3, 2, 2)])
def test_every_process_runs_the_same_number_of_micro_batches_at_every_tail(processes, micro_batch, grad_accum):
    step = processes * micro_batch * grad_accum
    for tail in range(1, step + 1):
        rows = list(range(tail))
        shares = [step_share(rows, DistContext(rank, processes), micro_batch) for rank in range(processes)]
        assert len({len(batches) for batches, _ in shares}) == 1, (tail, shares)  # collectives pair up
        trained = sorted(r for batches, padding in shares for b in batches[:len(batches) - padding] for r in b)
        assert trained == rows  # every row once; padding micro-batches carry weight 0
        assert all(len(b) <= micro_batch for batches, _ in shares for b in batches)


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_epoch_tails_of_every_residue_train_like_one_process(runs, parallel):
    for tail in TAILS[parallel]:
        summary = json.loads((runs / f"{parallel}_tail{tail}" / "summary.json").read_text())
        assert summary["data"]["train_samples"] == 8 + tail and summary["steps"] == 2  # a full step, then the tail
        assert_trains_like(runs / f"{parallel}_tail{tail}", runs / f"one_tail{tail}", 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(WHOLE_RUNS))
def test_two_processes_compute_the_gradients_of_one(runs, name):
    *_, compiled, tolerance, later = WHOLE_RUNS[name]
    two, one = runs / name, runs / f"one_{_reference(name)}"
    assert_trains_like(two, one, tolerance, later)
    summary = json.loads((two / "summary.json").read_text())
    assert summary["data_parallel"] == name.split("_")[0]
    # the fast path in every process: fused LoRA layers (DDP and FSDP), compiled blocks where asked
    assert summary["speedups"]["fused_lora_layers"] == 14  # 7 linears x 2 blocks
    assert summary["speedups"]["compiled_blocks"] == (2 if compiled else 0)
    # held-out losses: each process scores its share of the batches (an FSDP process short of one runs it
    # unscored), the sums added: the one-process figures
    reference = json.loads((one / "summary.json").read_text())
    assert summary["eval_tokens"] == reference["eval_tokens"] and (summary["eval_tokens"] > 0) == compiled
    for key in ("eval_loss_before", "eval_loss_after"):
        assert summary[key] == pytest.approx(reference[key], rel=tolerance, nan_ok=True), key
    if summary["data_parallel"] == "fsdp":  # each process holds about half of the frozen base (4-bit included)
        ratio = summary["frozen_weight_bytes_per_process"] / json.loads(
            (one / "summary.json").read_text())["frozen_weight_bytes_per_process"]
        assert 0.45 < ratio < 0.6, ratio


def _stopped_after_step_2(run: Path, copy: Path) -> dict:
    """A copy of a finished 4-step run as if stopped after step 2; its config, writing into the copy."""
    shutil.copytree(run, copy)
    for step in (3, 4):
        shutil.rmtree(copy / "checkpoints" / f"step-{step}")
    raw = json.loads(json.dumps(yaml.safe_load((copy / "config.yaml").read_text())))
    raw["output_dir"] = str(copy)
    return raw


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ddp_checkpointing", "fsdp_lora"])
def test_a_checkpoint_from_two_processes_resumes_on_one(runs, tmp_path, name):
    raw = _stopped_after_step_2(runs / name, tmp_path / name)
    raw["train"]["grad_accum"] = 2  # 1 process, micro 2 x accumulation 2
    summary = train(config_from_dict(raw), show_progress=False)
    assert summary["resumed_from"].endswith("step-2") and summary["world_size"] == 1
    assert adapter_gap(runs / "one_lora_fp32", tmp_path / name) < 1e-5


@pytest.mark.slow
def test_a_checkpoint_from_one_process_resumes_on_two(runs, tmp_path):
    specs = []
    for parallel in ("ddp", "fsdp"):
        raw = _stopped_after_step_2(runs / "one_lora_fp32", tmp_path / parallel)
        raw["train"].update(grad_accum=1, data_parallel=parallel)  # 2 processes, micro 2 x accumulation 1
        specs.append(raw)
    spec = tmp_path / "resumes.json"
    spec.write_text(json.dumps(specs))
    for status, stderr in finish(spawn([sys.executable, str(WORKER), str(spec)])):
        assert status == 0, stderr[-3000:]
    for parallel in ("ddp", "fsdp"):
        summary = json.loads((tmp_path / parallel / "summary.json").read_text())
        assert summary["resumed_from"].endswith("step-2") and summary["data_parallel"] == parallel
        # steps 3 and 4 on two processes: the losses, grad norms, gradients and adapter of one process
        assert_trains_like(tmp_path / parallel, runs / "one_lora_fp32", 1e-5)
        assert adapter_gap(runs / "one_lora_fp32", tmp_path / parallel) < 1e-5


def test_context_comes_from_the_launchers_environment():
    assert context_from_env({}) == DistContext()
    ctx = context_from_env({"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0"})
    assert ctx.enabled and not ctx.is_main and ctx.world_size == 4


def test_a_checkpoint_saved_with_two_gpus_visible_restores_on_one(monkeypatch):
    # a 2-process run saves every visible GPU's generator; resumed with one GPU visible it restores that one
    from snugtune.engine.checkpoint import restore_rng_state, rng_state
    state = rng_state()
    state["cuda"] = [torch.tensor([1], dtype=torch.uint8), torch.tensor([2], dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda value, index: restored.append((int(value[0]), index)))
    restore_rng_state(state)
    assert restored == [(1, 0)]
