"""An Ollama Modelfile beside an exported GGUF: `ollama create NAME -f Modelfile` then `ollama run NAME`.

The model's Jinja chat template is rewritten in Ollama's Go template syntax for the families whose turn
markers it recognises (ChatML: SmolLM2, Qwen2; Llama-3); the default system prompt the Jinja template
inserts becomes SYSTEM, and the turn markers become stop parameters. For any other template the Modelfile
has no TEMPLATE, and Ollama falls back to detecting the chat template stored in the GGUF itself.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from snugtune.errors import UserError
from snugtune.export.gguf_file import read_chat_template

# Go templates: the system prompt once (Ollama passes it as .System), then every other turn in order.
CHAT_FAMILIES = {
    "chatml": {
        "marker": "<|im_start|>",
        "template": ('{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
                     '{{- range .Messages }}{{ if ne .Role "system" }}<|im_start|>{{ .Role }}\n'
                     '{{ .Content }}<|im_end|>\n{{ end }}{{ end }}<|im_start|>assistant\n'),
        "system": r"<\|im_start\|>system\n(.*?)<\|im_end\|>",
        "stop": ["<|im_start|>", "<|im_end|>"],
    },
    "llama3": {
        "marker": "<|start_header_id|>",
        "template": ('{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>'
                     '{{ end }}{{- range .Messages }}{{ if ne .Role "system" }}<|start_header_id|>{{ .Role }}'
                     '<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}{{ end }}'
                     '<|start_header_id|>assistant<|end_header_id|>\n\n'),
        "system": r"<\|start_header_id\|>system<\|end_header_id\|>\n\n(.*?)<\|eot_id\|>",
        "stop": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    },
}
# generation_config.json's sampling settings under Ollama's parameter names
SAMPLING_PARAMETERS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                       "repetition_penalty": "repeat_penalty"}
MAX_CONTEXT = 8192  # Ollama allocates the whole context up front: keep a long-context model's default small


def chat_family(template: str | None) -> str | None:
    for name, family in CHAT_FAMILIES.items():
        if template and family["marker"] in template:
            return name
    return None


def default_system_prompt(template: str, family: str) -> str | None:
    """The system prompt the Jinja template adds to a conversation that has none (SmolLM2 does)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    rendered = ImmutableSandboxedEnvironment().from_string(template).render(
        messages=[{"role": "user", "content": "hello"}], add_generation_prompt=True, bos_token="", eos_token="")
    found = re.search(CHAT_FAMILIES[family]["system"], rendered, re.S)
    return found.group(1) if found else None


def quoted(text: str) -> str:
    """A Modelfile argument: triple-quoted, which keeps newlines and single quotes as they are."""
    if '"""' in text:
        raise UserError('the chat template holds """, which a Modelfile cannot quote')
    return f'"""{text}"""'


def modelfile_text(gguf_file: Path, model_dir: Path) -> str:
    template = read_chat_template(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    generation = model_dir / "generation_config.json"
    sampling = json.loads(generation.read_text()) if generation.is_file() else {}
    lines = [f"FROM ./{gguf_file.name}"]
    family = chat_family(template)
    if family is None:
        lines.append("# no TEMPLATE: the chat template is not one snugtune rewrites; Ollama reads the GGUF's own")
    else:
        lines.append(f"TEMPLATE {quoted(CHAT_FAMILIES[family]['template'])}")
        system = default_system_prompt(template, family)
        if system:
            lines.append(f"SYSTEM {quoted(system)}")
        lines += [f'PARAMETER stop "{stop}"' for stop in CHAT_FAMILIES[family]["stop"]]
    lines.append(f"PARAMETER num_ctx {min(config.get('max_position_embeddings', 2048), MAX_CONTEXT)}")
    if sampling.get("do_sample"):
        lines += [f"PARAMETER {name} {sampling[key]}" for key, name in SAMPLING_PARAMETERS.items()
                  if sampling.get(key) is not None]
    return "\n".join(lines) + "\n"


def write_modelfile(gguf_file: str | Path, model_dir: str | Path) -> Path:
    """Write GGUF_DIR/Modelfile for gguf_file (atomically); returns its path."""
    gguf_file, model_dir = Path(gguf_file), Path(model_dir)
    target = gguf_file.with_name("Modelfile")
    tmp = target.with_name(f".Modelfile.tmp-{os.getpid()}")
    tmp.write_text(modelfile_text(gguf_file, model_dir), encoding="utf-8")
    os.replace(tmp, target)
    return target
