"""Training under the preference objectives on shape:tiny: metrics each step and held-out, held-out preference
accuracy rising, both references of full runs alike, crash-safe checkpoints and exact resume as for SFT."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from conftest import pair_rows, tiny_config, write_jsonl
from snugtune.engine.checkpoint import complete_checkpoints
from snugtune.engine.distributed import DistContext
from snugtune.engine.train import set_up, train
from snugtune.errors import UserError


def metric_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


METRICS = {"dpo": {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen"},
           "orpo": {"rewards/margins", "nll_loss", "log_odds_ratio", "log_odds_chosen"},
           "kto": {"kl", "logps/chosen", "logps/rejected"}}


@pytest.mark.parametrize("objective", ["dpo", "orpo", "kto"])
def test_each_objective_trains_and_logs_its_metrics_each_step_and_held_out(tmp_path, pairs_file, objective):
    # KTO in bf16, the dtypes of a GPU run: a 16-bit base, fp32 LoRA, autocast around every forward
    precision = "bf16" if objective == "kto" else "fp32"
    cfg = tiny_config(tmp_path, pairs_file, objective=objective, train={"max_steps": 2, "micro_batch": 2,
                                                                        "precision": precision})
    summary = train(cfg, show_progress=False)
    assert summary["objective"] == objective and summary["steps"] == 2 and summary["precision"] == precision
    assert summary["reference"] == {"dpo": "adapter", "orpo": "none", "kto": "adapter"}[objective]
    rows = metric_rows(Path(cfg.output_dir))
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2] and METRICS[objective] <= set(steps[0]) | set(steps[1])
    assert all("kl" in r if objective == "kto" else METRICS[objective] <= set(r) for r in steps)  # KTO: a step's
    # rows may all be desirable, or all not: its rewards of the other kind are then not logged
    held = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in held] == [0, 2] and all({f"eval_{m}" for m in METRICS[objective]} <= set(r) for r in held)
    assert summary["eval_loss_before"] == held[0]["eval_loss"] and summary["eval_loss_after"] == held[1]["eval_loss"]
    assert METRICS[objective] <= set(summary["eval_metrics_after"])
    assert (Path(cfg.output_dir) / "adapter_model.safetensors").is_file()


def test_held_out_preference_accuracy_rises_on_a_tiny_dpo_run(tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(48))
    cfg = tiny_config(tmp_path, data, objective="dpo", eval={"every_steps": 4},
                      train={"max_steps": 12, "micro_batch": 4, "lr": 2e-2})
    summary = train(cfg, show_progress=False)
    held = [r for r in metric_rows(Path(cfg.output_dir)) if "eval_loss" in r]
    # before training the policy is its reference: every reward 0, no pair won, the loss log 2
    assert held[0]["eval_rewards/accuracies"] == 0.0 and held[0]["eval_loss"] == pytest.approx(0.6931, abs=1e-4)
    assert held[-1]["eval_rewards/accuracies"] >= 0.8 and held[-1]["eval_rewards/margins"] > 0.5
    assert held[-1]["eval_loss"] < 0.6 and summary["eval_metrics_after"]["rewards/accuracies"] >= 0.8
    from snugtune.evaluate.tasks import evaluate_run  # `snugtune eval`: base vs tuned on the same held-out pairs
    result = evaluate_run(cfg.output_dir, ["preference"], device="cpu")["preference"]
    assert result["pairs"] == 5 and result["tuned_margin"] > result["base_margin"] and result["reward_accuracy"] == 1.0


def test_preference_objectives_train_in_one_process(tmp_path, pairs_file):
    cfg = tiny_config(tmp_path, pairs_file, objective="dpo")
    with pytest.raises(UserError, match="objective: dpo trains in one process for now"):
        set_up(cfg, lambda message: None, DistContext(rank=0, world_size=2), 0.0)


@pytest.mark.slow
def test_a_full_run_trains_alike_against_a_frozen_copy_and_precomputed_log_probabilities(tmp_path, pairs_file):
    weights, notices = {}, {}
    for name, budget in (("copy", "8GiB"), ("precomputed", "auto")):
        cfg = tiny_config(tmp_path, pairs_file, objective="dpo", method="full", budget=budget, output_dir=str(
            tmp_path / name), train={"max_steps": 3, "micro_batch": 2, "lr": 1e-3}, save={"every_steps": 2})
        notices[name] = []
        summary = train(cfg, show_progress=False, notify=notices[name].append)
        assert summary["reference"] == name
        weights[name] = load_file(str(tmp_path / name / "model.safetensors"))
        losses = [r["loss"] for r in metric_rows(tmp_path / name) if "loss" in r]
        weights[name + " losses"] = losses
    assert weights["copy losses"] == pytest.approx(weights["precomputed losses"], rel=1e-5)
    for key, value in weights["copy"].items():
        assert (value - weights["precomputed"][key]).abs().max() <= 1e-5, key
    assert (tmp_path / "precomputed" / "reference_logps.json").is_file() and not (tmp_path / "copy" / "reference_logps.json").exists()
    assert any("computing the base model's log-probabilities" in n for n in notices["precomputed"])
    # a resumed run reads the stored log-probabilities: the model it builds is trained already
    longer = tiny_config(tmp_path, pairs_file, objective="dpo", method="full", output_dir=str(tmp_path / "precomputed"),
                         train={"max_steps": 4, "micro_batch": 2, "lr": 1e-3}, save={"every_steps": 2})
    again = []
    assert train(longer, show_progress=False, notify=again.append)["steps"] == 4
    assert not any("computing" in n for n in again) and any("resuming from" in n for n in again)


def _config_file(tmp_path: Path, data: Path, name: str) -> Path:
    raw = {"model": "shape:tiny", "data": {"path": str(data), "eval_fraction": 0.1}, "max_seq_len": 96,
           "method": "lora", "objective": "dpo", "lora": {"r": 4, "alpha": 8, "dropout": 0.1, "targets": "all-linear"},
           "train": {"max_steps": 12, "micro_batch": 2, "grad_accum": 2, "lr": 5e-3, "seed": 3},
           "save": {"every_steps": 3, "keep": 5}, "output_dir": str(tmp_path / name), "device": "cpu"}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _cli(config: Path):
    return subprocess.run([sys.executable, "-m", "snugtune", "train", str(config), "--quiet"], capture_output=True,
                          text=True)


# mid-third only: the kill inside the third step's checkpoint; a kill between steps is the SFT tests' second case
# (tests/engine/test_reliability.py), through the same resume code
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["mid-third"])
def test_a_dpo_run_killed_then_resumed_equals_an_uninterrupted_one(tmp_path, mode):
    from test_reliability import COMPARED, KILLER  # the SFT harness: SIGKILL after or inside a checkpoint
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(64))
    assert _cli(_config_file(tmp_path, data, "straight")).returncode == 0
    killed = _config_file(tmp_path, data, "killed")
    proc = subprocess.run([sys.executable, "-c", KILLER, str(killed), mode], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert [p.name for p in complete_checkpoints(tmp_path / "killed")] == ["step-3", "step-6"]
    resumed = _cli(killed)
    assert resumed.returncode == 0 and "resuming from" in resumed.stderr, resumed.stderr
    a = load_file(str(tmp_path / "straight" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    compared = COMPARED + ("rewards/margins", "rewards/accuracies", "eval_loss", "eval_rewards/margins")
    rows = lambda run: [{k: r.get(k) for k in compared} for r in metric_rows(tmp_path / run)]  # noqa: E731
    assert rows("straight") == rows("killed")
