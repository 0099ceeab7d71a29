"""Loading a finished run directory for inference: the base as it was trained (quantized the same way)
plus the adapter, with a way to score the base alone for side-by-side numbers."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from snugtune.config import Config, config_from_dict
from snugtune.errors import UserError
from snugtune.precision import Precision, resolve_device, resolve_precision
from snugtune.models.load import load_base_model, load_tokenizer
from snugtune.rundir import ADAPTER_WEIGHTS, CONFIG, RunFolder


@dataclass(frozen=True)
class Trust:
    """What the user allowed on the command line. Never read from a run folder: opening someone else's run
    folder must not run its code or unpickle its files."""
    remote_code: bool = False      # a model's own Python code (transformers' trust_remote_code)
    pickle_weights: bool = False   # .bin / .pt weights of the base model
    unisolated_code: bool = False  # HumanEval's generated code where the machine cannot isolate it


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


def load_run(run_dir: str | Path, device: str = "auto", trust: Trust = Trust()) -> LoadedRun:
    """Load RUN_DIR (config.yaml, adapter or trained weights, tokenizer) for evaluation or chat; the trust
    settings in its config.yaml are replaced by `trust` (the command line's)."""
    run_dir = Path(run_dir)
    run = RunFolder(run_dir)
    config = config_from_dict(run.config_dict(), source=str(run_dir / CONFIG))
    config = config.model_copy(update={"trust_remote_code": trust.remote_code,
                                       "allow_pickle_weights": trust.pickle_weights})
    base_path = run.base_model_folder()
    if not trust.pickle_weights and not list(base_path.glob("*.safetensors")) and list(base_path.glob("*.bin")):
        raise UserError(f"{base_path}: the run's base model holds only pickle (.bin) weights, which can run code when "
                        f"loaded; pass --allow-pickle-weights if you trust them")
    dev = resolve_device(device)
    precision = resolve_precision(config.train.precision, dev)
    tokenizer = load_tokenizer(run_dir)
    if tokenizer.padding_side != "left":
        tokenizer.padding_side = "left"  # batched generation continues from the right edge
    if config.uses_lora:
        model, untouched = _adapted_base(run_dir, base_path, config, dev, precision), None
    else:
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(run_dir, dtype=precision.compute_dtype, use_safetensors=True).to(dev)
        untouched = load_base_model(base_path, config.model_copy(update={"method": "lora"}), dev,
                                    precision.compute_dtype).eval()
    model.eval()
    return LoadedRun(run_dir, config, model, untouched, tokenizer, dev, precision)


def _adapted_base(run_dir: Path, base_path: Path, config: Config, device, precision):
    """The base with the run's adapter, read from safetensors only (an adapter_model.bin would be unpickled)."""
    from peft import PeftModel
    if not (run_dir / ADAPTER_WEIGHTS).is_file():
        raise UserError(f"{run_dir}: no adapter_model.safetensors; finish the run with `snugtune train` "
                        f"(snugtune reads adapters from safetensors only)")
    base = load_base_model(base_path, config, device, precision.compute_dtype)
    try:
        return PeftModel.from_pretrained(base, run_dir)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
        raise UserError(f"{run_dir}: its adapter (adapter_config.json, adapter_model.safetensors) cannot be loaded "
                        f"({str(exc).splitlines()[0][:200]}); rerun `snugtune train` on the run's config") from None
