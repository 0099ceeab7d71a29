"""engine.recovery: an out-of-memory error steps down to the planner's next plan (planner.apply.step_down) and the run carries on."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import tiny_config
from snugtune.errors import DoesNotFit
from snugtune.engine import train as train_module
from snugtune.engine.train import train


@pytest.mark.slow
def test_an_oom_re_plans_the_micro_batch_and_continues_on_the_same_rows(tmp_path, alpaca_file, monkeypatch):
    reference = tiny_config(tmp_path / "a", alpaca_file, output_dir=str(tmp_path / "ref"),
                            train={"max_steps": 4, "micro_batch": 2, "grad_accum": 2})
    train(reference, show_progress=False)
    real = train_module.accumulate_gradients

    def oom_when_big(model, group, *args):
        if group[0]["input_ids"].shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(model, group, *args)
    monkeypatch.setattr(train_module, "accumulate_gradients", oom_when_big)
    notices = []
    cfg = tiny_config(tmp_path / "b", alpaca_file, output_dir=str(tmp_path / "oom"),
                      train={"max_steps": 4, "micro_batch": 4, "grad_accum": 1})
    summary = train(cfg, show_progress=False, notify=notices.append)
    assert summary["steps"] == 4 and any("re-planned to micro_batch=2 x grad_accum=2" in n for n in notices)
    a = load_file(str(tmp_path / "ref" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "oom" / "adapter_model.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    assert "micro_batch: 2" in (tmp_path / "oom" / "config.yaml").read_text()


def _oom_on_calls(monkeypatch, calls: set[int]):
    """accumulate_gradients raising CUDA's out-of-memory error on the given calls (1-based)."""
    real = train_module.accumulate_gradients
    seen = []

    def flaky(*args, **kwargs):
        seen.append(1)
        if len(seen) in calls:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(*args, **kwargs)
    monkeypatch.setattr(train_module, "accumulate_gradients", flaky)


def test_an_oom_at_one_micro_batch_steps_down_the_planners_levels_and_carries_on(tmp_path, alpaca_file, monkeypatch):
    # a budget on the CPU is planned as for that card, for a run on the CPU (no compiled blocks or CUDA graphs);
    # one row per step: the split cannot shrink; rows of 2,048 tokens: activations a large enough share of the
    # tiny model's peak for each level of recomputation to matter
    sections = dict(budget="2GiB", lora={"dropout": 0.0}, max_seq_len=2048,
                    train={"max_steps": 4, "micro_batch": "auto", "rows_per_step": 1, "grad_checkpointing": "auto"})
    train(tiny_config(tmp_path / "a", alpaca_file, output_dir=str(tmp_path / "ref"), **sections), show_progress=False)
    _oom_on_calls(monkeypatch, {2, 3})
    notices = []
    summary = train(tiny_config(tmp_path / "b", alpaca_file, output_dir=str(tmp_path / "oom"), **sections),
                    show_progress=False, notify=notices.append)
    reference = json.loads((tmp_path / "ref" / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["oom_resplits"] == 2 and len(summary["step_downs"]) == 2
    assert summary["plan"]["predicted_peak_bytes"] < reference["plan"]["predicted_peak_bytes"]
    # the split and its predicted step time are recorded (one row a step: 1 x 1)
    assert (summary["plan"]["micro_batch"], summary["plan"]["grad_accum"]) == (1, 1)
    assert 0 < reference["plan"]["predicted_step_seconds"] and summary["plan"]["settings"]["micro_batch"] == 1
    peaks = [reference["plan"]["predicted_peak_bytes"] / 2**30]
    for notice in summary["step_downs"]:  # each names what it changed, each predicted lower than the last
        assert "ran out of memory: stepped down to " in notice and "=" in notice.split("stepped down to ")[1]
        before, after = notice.split("predicted peak ")[1].split(" GiB")[0].split(" -> ")
        assert float(before) == pytest.approx(peaks[-1], abs=1e-3) and float(after) < float(before)
        peaks.append(float(after))
    # the CUDA graphs' pool released, checkpointing, offload: the steps the planner chose are the run's config
    config = yaml.safe_load((tmp_path / "oom" / "config.yaml").read_text())
    assert (config["train"]["grad_checkpointing"], config["train"]["cuda_graphs"]) == \
        (summary["plan"]["grad_checkpointing"], "auto" if summary["plan"]["cuda_graphs"] else False)
    assert any("grad_checkpointing=True" in n for n in summary["step_downs"])  # a step that needed a new model
    # the same step was carried on: the adapter is the one the run without errors trained
    a = load_file(str(tmp_path / "ref" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "oom" / "adapter_model.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5


def test_running_out_at_every_level_ends_in_exit_3_with_the_numbers(tmp_path, alpaca_file, monkeypatch):
    _oom_on_calls(monkeypatch, set(range(1, 100)))
    cfg = tiny_config(tmp_path, alpaca_file, budget="2GiB",
                      train={"max_steps": 2, "micro_batch": "auto", "rows_per_step": 1})
    with pytest.raises(DoesNotFit) as refused:
        train(cfg, show_progress=False)
    message = str(refused.value)
    assert "ran out of memory with method=lora micro_batch=1" in message
    assert "predicted peak" in message and "keeping 8% in reserve" in message and "Try: " in message
    assert "method=qlora" not in message.split("Try: ")[1] or cfg.method != "qlora"


def test_the_plans_dense_copy_is_the_run_configs_and_dropping_it_builds_a_new_model(tmp_path, alpaca_file):
    from snugtune.planner.choose import plan_for_budget
    from snugtune.planner.apply import step_down
    from snugtune.planner.cards import GIB
    from snugtune.planner.inventory import inventory_for
    from snugtune.planner.plan import needs_new_model
    # eager steps asked: else releasing the graphs' pool is the cheaper step down (the step is bound by the GPU);
    # no recomputation: else recomputing a few blocks beside the copy is
    asked = tiny_config(tmp_path, alpaca_file, model="shape:llama3-8b", method="qlora", max_seq_len=2048,
                        train={"micro_batch": 1, "grad_accum": 1, "grad_checkpointing": False, "cuda_graphs": False})
    plan = plan_for_budget(asked, 80 * GIB, "h100", host_available=64 * GIB)
    run = plan.config
    assert plan.decisions.dense_copy and run.quant.dense_copy is True and asked.quant.dense_copy == "auto"
    lean = run.model_copy(update={"quant": run.quant.model_copy(update={"dense_copy": False})})
    assert needs_new_model(run, lean)  # the copies are made when the model is built
    smaller, notice = step_down(asked, plan, "step 1", inventory_for(asked))  # the cheapest step: no copy, same settings
    assert smaller.peak_bytes < plan.peak_bytes and smaller.config.quant.dense_copy is False
    assert "stepped down to quant.dense_copy=False (" in notice and not smaller.decisions.grad_checkpointing


def test_a_step_down_changes_the_split_in_place_and_asks_for_another_model_to_recompute(tmp_path, alpaca_file):
    import time
    from snugtune.engine.distributed import SINGLE
    from snugtune.engine.recovery import build_that_fits, step_down
    from snugtune.engine.train import set_up
    from snugtune.planner.apply import plan_run

    def built(seq: int, rows: int, out: str):
        cfg = tiny_config(tmp_path, alpaca_file, budget="2GiB", lora={"dropout": 0.0}, max_seq_len=seq,
                          output_dir=str(tmp_path / out), train={"max_steps": 2, "micro_batch": "auto",
                                                                  "rows_per_step": rows, "grad_checkpointing": "auto"})
        job = set_up(cfg, lambda message: None, SINGLE, time.perf_counter())
        return build_that_fits(job, plan_run(cfg, job.inventory, job.trained_per_row, 1, job.masked, cuda=False))

    # two rows of 4,096 tokens a step: recomputing the first block, then every block, needs a model built for
    # it; then the split shrinks in place, same model
    run = built(4096, 2, "steps")
    model = run.model
    assert (run.plan.decisions.micro_batch, run.plan.grad_accum) == (2, 1) and not run.plan.decisions.grad_checkpointing
    assert step_down(run, "step 1") is True
    assert run.plan.decisions.grad_checkpointing and run.config.train.grad_checkpointing is True
    assert "step 1 ran out of memory: stepped down to train.grad_checkpointing=True" in run.job.step_downs[0]
    assert step_down(run, "step 1") is True and run.plan.decisions.checkpointed_layers is None
    assert step_down(run, "step 1") is False
    assert run.model is model and (run.plan.decisions.micro_batch, run.plan.grad_accum) == (1, 2)
    assert run.config.train.micro_batch == 1 and len(run.job.step_downs) == 3
