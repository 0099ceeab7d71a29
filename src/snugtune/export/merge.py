"""Merging a LoRA adapter into its base, streamed one tensor at a time.

The base is read from its full-precision safetensors (never from quantized weights), each adapted
weight gets W + scale * B @ A computed in fp32, and the result is written in shards as a standard
Hugging Face folder. Peak memory is about one shard, whatever the model's size.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import safetensors
import torch
from safetensors.torch import load_file, save_file

from snugtune.errors import UserError
from snugtune.output_folder import check_target, discard, publish, staging_folder
from snugtune.rundir import RunFolder

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SHARD_BYTES = 2 * 2**30
_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
                       "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def _read_tensors(path: Path):
    """Yield (name, tensor) from a safetensors file with plain reads, one tensor in memory at a time.

    (safe_open memory-maps the file, and every page it touched stays in the process's resident set until
    the file is closed: several GiB per shard of a 7B model.)
    """
    with open(path, "rb") as handle:
        header_len = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(header_len))
        start = 8 + header_len
        header.pop("__metadata__", None)
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            begin, end = info["data_offsets"]
            handle.seek(start + begin)
            buffer = bytearray(end - begin)
            handle.readinto(buffer)
            dtype = _SAFETENSORS_DTYPES[info["dtype"]]
            yield name, torch.frombuffer(buffer, dtype=dtype).reshape(info["shape"]) if buffer else \
                torch.empty(info["shape"], dtype=dtype)


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    files = sorted(folder.glob("*.safetensors"))
    files = [f for f in files if not f.name.startswith("adapter_")]
    if not files:
        raise UserError(f"{folder}: no safetensors weights to merge from")
    return files


def _lora_deltas(run_dir: Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float, dict]:
    """{base weight name: (A, B)}, the scale, and the adapter config."""
    config_path = run_dir / "adapter_config.json"
    try:
        config = json.loads(config_path.read_text())
        weights = load_file(str(run_dir / "adapter_model.safetensors"))
    except (OSError, ValueError, safetensors.SafetensorError) as exc:
        raise UserError(f"{run_dir}: its adapter (adapter_config.json, adapter_model.safetensors) cannot be read "
                        f"({exc}); run `snugtune train` on the run's config to write it again") from None
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise UserError(f"{run_dir}: adapters with per-module rank or alpha patterns are not supported by merge")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        if ".lora_A." not in key and ".lora_B." not in key:
            raise UserError(f"{run_dir}: adapter tensor {key} is not a LoRA A/B matrix; merge supports LoRA only")
        module, _, rest = key.partition(".lora_")
        base_name = module.removeprefix("base_model.model.") + ".weight"
        pairs.setdefault(base_name, {})[rest[0]] = tensor
    r = config["r"]
    scale = config["lora_alpha"] / (math.sqrt(r) if config.get("use_rslora") else r)
    return {name: (ab["A"], ab["B"]) for name, ab in pairs.items()}, scale, config


def check_merge(run_dir: Path, out_dir: Path, dtype: str) -> None:
    """UserError unless run_dir is a finished run, dtype one of DTYPES and out_dir new, empty or an earlier
    merge's output (see output_folder)."""
    RunFolder(run_dir).summary()  # names the missing or broken file otherwise
    if dtype not in DTYPES:
        raise UserError(f"--dtype: choose one of {', '.join(DTYPES)}")
    check_target(out_dir, "merge", [run_dir])


def merge_run(run_dir: str | Path, out_dir: str | Path, dtype: str = "bf16") -> Path:
    """Write a merged HF model folder for RUN_DIR at out_dir (after check_merge); returns out_dir."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    check_merge(run_dir, out_dir, dtype)
    run = RunFolder(run_dir)
    if (run_dir / "adapter_model.safetensors").is_file():
        deltas, scale, _ = _lora_deltas(run_dir)
        base = run.base_model_folder()
    else:  # freeze / full runs saved the whole trained model
        deltas, scale, base = {}, 0.0, run_dir
    staging = staging_folder(out_dir)
    try:
        _write_merged(staging, run_dir, base, deltas, scale, dtype)
        return publish(staging, out_dir, "merge")
    except BaseException:
        discard(staging)
        raise


def _write_merged(tmp: Path, run_dir: Path, base: Path, deltas: dict, scale: float, dtype: str) -> None:
    out_dtype = DTYPES[dtype]
    used: set[str] = set()
    shard: dict[str, torch.Tensor] = {}
    shard_bytes, shards = 0, []

    def flush() -> None:
        nonlocal shard, shard_bytes
        if shard:
            name = f"model-{len(shards) + 1:05d}.safetensors"
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
            shards.append((name, list(shard)))
            shard, shard_bytes = {}, 0

    for path in _weight_files(base):
        for name, tensor in _read_tensors(path):
            if name in deltas:
                a, b = deltas[name]
                tensor = (tensor.float() + scale * (b.float() @ a.float())).to(out_dtype)
                used.add(name)
            elif tensor.is_floating_point():
                tensor = tensor.to(out_dtype)
            shard[name] = tensor.contiguous()
            shard_bytes += tensor.numel() * tensor.element_size()
            if shard_bytes >= SHARD_BYTES:
                flush()
    flush()
    missing = set(deltas) - used
    if missing:
        raise UserError(f"{run_dir}: adapter weights for {sorted(missing)[:3]} have no matching base tensor")
    _name_shards(tmp, shards)
    config = json.loads((base / "config.json").read_text())
    config.pop("quantization_config", None)
    config["dtype"] = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype]
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    if (base / "generation_config.json").is_file():
        shutil.copy(base / "generation_config.json", tmp / "generation_config.json")
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
              "tokenizer.model"):
        if (run_dir / f).is_file():
            shutil.copy(run_dir / f, tmp / f)


def _name_shards(tmp: Path, shards: list[tuple[str, list[str]]]) -> None:
    """Give the shards Hugging Face's names (one: model.safetensors) and write the index for several."""
    total = len(shards)
    names = {}
    for i, (name, keys) in enumerate(shards, start=1):
        final = f"model-{i:05d}-of-{total:05d}.safetensors" if total > 1 else "model.safetensors"
        os.replace(tmp / name, tmp / final)
        names.update({k: final for k in keys})
    if total > 1:
        (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": names}, indent=2))
