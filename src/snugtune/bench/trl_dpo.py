"""TRL's DPOTrainer on the plain transformers + peft + bitsandbytes stack, as TRL's users run it, on the pairs of a
snugtune DPO bench config, for `snugtune bench --objective dpo --against trl`.

What TRL's docs show: the base loaded 4-bit (nf4, double quant) with transformers' BitsAndBytesConfig, the LoRA
config handed to DPOTrainer (which prepares the quantized model for training and uses the base with the adapter
disabled as the reference), gradient checkpointing, bf16, the optimizer the config names, the conversational
rows rendered with the model's chat template (the tokens snugtune trains: tests/test_preference_loss.py) and cut
to max_length = max_seq_len per sequence, TRL's own loss. Tokens/s counts both sequences of every pair, as
snugtune's does; each step is timed from its start to its optimizer step (the GPU waited for).

  python -m snugtune.bench.trl_dpo CONFIG.yaml [key=value ...] --out trl.json   (snugtune bench runs it)
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

OPTIMIZERS = {"adamw": "adamw_torch", "adamw_8bit": "adamw_bnb_8bit", "paged_adamw_8bit": "paged_adamw_8bit"}


def preference_rows(path: str) -> list[dict]:
    """The bench's pairs file: one JSON row per line (conversational prompt, chosen, rejected)."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def dpo_arguments(cfg, out_dir: Path, device: torch.device, dtype: torch.dtype):
    """TRL's DPOConfig for the bench config: its beta, micro-batch, accumulation, learning rate (constant, no
    warmup, as the bench's snugtune run), optimizer, steps and max_length; checkpointing; bf16 where the model's
    `dtype` (bench_setup's) is."""
    from trl import DPOConfig
    tc = cfg.train
    return DPOConfig(output_dir=str(out_dir), beta=cfg.preference.beta, loss_type=[cfg.preference.loss_type],
                     per_device_train_batch_size=tc.micro_batch, gradient_accumulation_steps=tc.grad_accum,
                     learning_rate=tc.lr, lr_scheduler_type="constant", warmup_steps=0, max_steps=tc.max_steps,
                     optim=OPTIMIZERS[tc.optimizer], max_length=cfg.max_seq_len, gradient_checkpointing=True,
                     bf16=dtype == torch.bfloat16, use_cpu=device.type != "cuda", logging_steps=1, save_strategy="no",
                     report_to=[], seed=tc.seed, dataloader_drop_last=True, remove_unused_columns=False)


def step_timer(device: torch.device):
    """A TrainerCallback recording each optimizer step's seconds, the device waited for at both ends."""
    from transformers import TrainerCallback

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.seconds: list[float] = []
            self.start = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            if device.type == "cuda":
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if device.type == "cuda":
                torch.cuda.synchronize()
            self.seconds.append(time.perf_counter() - self.start)
    return StepTimes()


def pair_tokens(trainer, max_len: int) -> float:
    """Mean tokens of a pair as the trainer trains it: prompt + chosen and prompt + rejected, each cut to max_len."""
    rows = trainer.train_dataset
    total = sum(min(len(r["prompt_ids"]) + len(r["chosen_ids"]), max_len)
                + min(len(r["prompt_ids"]) + len(r["rejected_ids"]), max_len) for r in rows)
    return total / len(rows)


def measure(trainer, cfg, device: torch.device, recipe: str) -> dict:
    """Train cfg.train.max_steps steps; the bench result (bench.plain.step_result) from the timed steps."""
    from snugtune.bench.plain import step_result
    timer = step_timer(device)
    trainer.add_callback(timer)
    trainer.train()
    per_step = pair_tokens(trainer, cfg.max_seq_len) * cfg.train.micro_batch * cfg.train.grad_accum
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    return step_result(recipe, cfg, timer.seconds, [round(per_step)] * len(timer.seconds), losses, device)


def bench_setup(description: str):
    """Parse `CONFIG [key=value ...] --out FILE`; (out, config, the model's folder, the device, its dtype: bf16 on
    a GPU; on a CPU, bf16 where snugtune's run of the config is bf16 (precision: auto on a CPU with native bf16),
    else fp32)."""
    from snugtune.bench.plain import bench_arguments
    from snugtune.engine.machine import cap_memory
    from snugtune.models.resolve import resolve_model
    from snugtune.precision import resolve_precision
    out, cfg = bench_arguments(description)
    cuda = torch.cuda.is_available() and cfg.device != "cpu"
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        cap_memory(device, cfg.budget)  # the cap the engine applies for the same budget
    bf16 = cuda or resolve_precision(cfg.train.precision, device).name == "bf16"
    return out, cfg, resolve_model(cfg.model).path, device, torch.bfloat16 if bf16 else torch.float32


def main() -> None:
    out, cfg, path, device, dtype = bench_setup("TRL's DPOTrainer on transformers + peft + bitsandbytes")
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import DPOTrainer, __version__ as trl_version

    from snugtune.bench.plain import write_result
    from snugtune.registry import block_linear_names
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.quant.type,
                               bnb_4bit_use_double_quant=cfg.quant.double_quant, bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=dtype,
                                                 device_map={"": device})
    tokenizer = AutoTokenizer.from_pretrained(path)
    targets = cfg.lora.targets if cfg.lora.targets != "all-linear" else block_linear_names(model.config.model_type)
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=list(targets), task_type="CAUSAL_LM")
    from datasets import Dataset
    trainer = DPOTrainer(model=model, args=dpo_arguments(cfg, Path(out).parent / "trl-out", device, dtype),
                         train_dataset=Dataset.from_list(preference_rows(cfg.data.path)), processing_class=tokenizer,
                         peft_config=lora)
    write_result(out, {**measure(trainer, cfg, device, f"TRL {trl_version} DPOTrainer, transformers + peft + "
                                                       f"bitsandbytes"),
                       "precision": "bf16" if dtype == torch.bfloat16 else "fp32"})


if __name__ == "__main__":
    main()
