"""Loading a finished run directory for inference: the base as it was trained (quantized the same way)
plus the adapter, with a way to score the base alone for side-by-side numbers."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

from snugtune.config import Config, config_from_dict
from snugtune.precision import Precision, resolve_device, resolve_precision
from snugtune.models import load_base_model, load_tokenizer
from snugtune.rundir import CONFIG, RunFolder


@dataclass
class LoadedRun:
    run_dir: Path
    config: Config
    model: torch.nn.Module     # base + adapter (or the trained model for freeze/full)
    base: torch.nn.Module | None  # the untouched base for freeze/full runs; None for LoRA (adapter disabled instead)
    tokenizer: object
    device: torch.device
    precision: Precision

    @contextlib.contextmanager
    def base_model(self):
        """The base model's view: the adapter switched off (LoRA) or the separately loaded base."""
        if self.base is not None:
            yield self.base
        else:
            with self.model.disable_adapter():
                yield self.model


def load_run(run_dir: str | Path, device: str = "auto") -> LoadedRun:
    """Load RUN_DIR (config.yaml, adapter or trained weights, tokenizer) for evaluation or chat."""
    run_dir = Path(run_dir)
    run = RunFolder(run_dir)
    config = config_from_dict(run.config_dict(), source=str(run_dir / CONFIG))
    base_path = run.base_model_path()
    dev = resolve_device(device)
    precision = resolve_precision(config.train.precision, dev)
    tokenizer = load_tokenizer(run_dir)
    if tokenizer.padding_side != "left":
        tokenizer.padding_side = "left"  # batched generation continues from the right edge
    if config.uses_lora:
        from peft import PeftModel
        base = load_base_model(base_path, config, dev, precision.compute_dtype)
        model = PeftModel.from_pretrained(base, run_dir)
        untouched = None
    else:
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(run_dir, dtype=precision.compute_dtype, use_safetensors=True).to(dev)
        untouched = load_base_model(base_path, config.model_copy(update={"method": "lora"}), dev,
                                    precision.compute_dtype).eval()
    model.eval()
    return LoadedRun(run_dir, config, model, untouched, tokenizer, dev, precision)
