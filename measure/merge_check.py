"""Spot-check a merged folder against W + (alpha/r) B @ A for one adapted weight, read straight from files.

  python measure/merge_check.py RUN_DIR MERGED_DIR [TENSOR_NAME]
"""

import json
import sys
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file


def tensor(folder: Path, name: str):
    index = folder / "model.safetensors.index.json"
    file = json.loads(index.read_text())["weight_map"][name] if index.is_file() else "model.safetensors"
    with safe_open(str(folder / file), "pt") as handle:
        return handle.get_tensor(name)


run, merged = Path(sys.argv[1]), Path(sys.argv[2])
name = sys.argv[3] if len(sys.argv) > 3 else "model.layers.0.self_attn.q_proj.weight"
base = Path(json.loads((run / "summary.json").read_text())["base_model_path"])
config = json.loads((run / "adapter_config.json").read_text())
adapter = load_file(str(run / "adapter_model.safetensors"))
module = "base_model.model." + name.removesuffix(".weight")
a, b = adapter[module + ".lora_A.weight"].float(), adapter[module + ".lora_B.weight"].float()
w0, w = tensor(base, name), tensor(merged, name)
expected = (w0.float() + config["lora_alpha"] / config["r"] * (b @ a)).to(w.dtype)
print(json.dumps({"tensor": name, "dtype": str(w.dtype), "max_abs_diff": float((w.float() - expected.float()).abs().max()),
                  "delta_norm": float((w.float() - w0.float()).norm())}))
