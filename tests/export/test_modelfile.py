"""The Ollama Modelfile written beside a GGUF: parsed back as Ollama reads it, and its Go template rendered
here for the conversations transformers renders with the model's own Jinja chat template."""

import functools
import json
import re
import shutil
from pathlib import Path

from snugtune.export.modelfile import write_modelfile
from snugtune.models.resolve import resolve_model

LLAMA3_TEMPLATE = ("{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                   "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
                   "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
CONVERSATION = [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "The sum is 5."},
                {"role": "user", "content": "And 4 and 4?\nThink first."}]


def parse_modelfile(text: str) -> dict:
    """Ollama's Modelfile grammar: INSTRUCTION then a bare, "quoted" or \"\"\"multi-line\"\"\" argument;
    PARAMETER takes a name and a value and may repeat; # starts a comment line."""
    parsed: dict = {"PARAMETER": {}}
    pattern = re.compile(r'^(\w+) +(?:"""(.*?)"""|"((?:[^"\\]|\\.)*)"|(.*?))$', re.S | re.M)
    rest = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    for match in pattern.finditer(rest):
        command, value = match.group(1).upper(), next(g for g in match.groups()[1:] if g is not None)
        if command == "PARAMETER":
            name, _, argument = value.partition(" ")
            parsed["PARAMETER"].setdefault(name, []).append(argument.strip().strip('"'))
        else:
            assert command not in parsed, f"{command} given twice"
            parsed[command] = value
    return parsed


def render_go_template(template: str, system: str, messages: list[dict]) -> str:
    """The part of Go's text/template these templates use: {{- / -}} trimming, if, range, ne, fields."""
    pieces = re.split(r"({{-?\s*.*?\s*-?}})", template)
    for i, piece in enumerate(pieces):  # trim markers eat the whitespace beside them
        if piece.startswith("{{-"):
            pieces[i - 1] = pieces[i - 1].rstrip()
        if piece.endswith("-}}") and i + 1 < len(pieces):
            pieces[i + 1] = pieces[i + 1].lstrip()
    actions = [p if not p.startswith("{{") else p.strip("{}- ") for p in pieces]

    def run(start: int, scope: dict, out: list[str]) -> int:
        i = start
        while i < len(actions):
            action, is_action = actions[i], pieces[i].startswith("{{")
            if not is_action:
                out.append(action)
            elif action == "end":
                return i
            elif action.startswith("if ") or action.startswith("range "):
                inner_start = i + 1
                items = [scope] if action.startswith("if ") and truth(action[3:], scope) else \
                    [{**scope, "Role": m["role"], "Content": m["content"]} for m in scope["Messages"]] if action.startswith("range ") else []
                i = skip(inner_start)
                for item in items:
                    run(inner_start, item, out)
            else:
                out.append(scope[action.lstrip(".")])
            i += 1
        return i

    def truth(condition: str, scope: dict) -> bool:
        ne = re.fullmatch(r'ne \.(\w+) "(.*)"', condition)
        return scope[ne.group(1)] != ne.group(2) if ne else bool(scope[condition.lstrip(".")])

    def skip(start: int) -> int:
        return run(start, {"Messages": [], "System": "", "Role": "", "Content": ""}, [])

    out: list[str] = []
    run(0, {"System": system, "Messages": messages, "Role": "", "Content": ""}, out)
    return "".join(out)


def model_folder(tmp_path: Path, template: str | None, **config) -> Path:
    """A merged-model folder as merge writes it (SmolLM2's tokenizer), without weights: the Modelfile reads
    the config, generation config and chat template only."""
    source = resolve_model("shape:tiny").path
    folder = tmp_path / "merged"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(source / name, folder / name)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 8192,
                                                    **config}))
    if template is not None:
        (folder / "chat_template.jinja").write_text(template)
    (folder / "merged-q4_k_m.gguf").write_bytes(b"GGUF")
    return folder


@functools.cache
def tokenizer_of(folder: Path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(folder)


def jinja_render(folder: Path, messages: list[dict]) -> str:
    """The conversation as transformers renders it with the folder's own chat template."""
    return tokenizer_of(folder).apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_chatml_modelfile_renders_what_the_jinja_template_renders(tmp_path):
    smollm2 = (resolve_model("shape:tiny").path / "chat_template.jinja").read_text()
    folder = model_folder(tmp_path, smollm2)
    path = write_modelfile(folder / "merged-q4_k_m.gguf", folder)
    assert path == folder / "Modelfile"
    parsed = parse_modelfile(path.read_text())
    assert (path.parent / parsed["FROM"]).is_file() and parsed["FROM"] == "./merged-q4_k_m.gguf"
    assert parsed["PARAMETER"]["stop"] == ["<|im_start|>", "<|im_end|>"]
    assert parsed["PARAMETER"]["num_ctx"] == ["8192"]
    # Ollama passes the Modelfile's SYSTEM when a conversation has no system message of its own
    assert parsed["SYSTEM"] == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    for messages, system in [(CONVERSATION, parsed["SYSTEM"]),
                             ([{"role": "system", "content": "Be brief."}, *CONVERSATION], "Be brief.")]:
        assert render_go_template(parsed["TEMPLATE"], system, messages) == jinja_render(folder, messages)


def test_llama3_modelfile_renders_what_the_jinja_template_renders(tmp_path):
    folder = model_folder(tmp_path, LLAMA3_TEMPLATE, max_position_embeddings=131072)
    parsed = parse_modelfile(write_modelfile(folder / "merged-q4_k_m.gguf", folder).read_text())
    assert parsed["PARAMETER"]["stop"] == ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    assert parsed["PARAMETER"]["num_ctx"] == ["8192"]  # capped: Ollama allocates the whole context
    assert "SYSTEM" not in parsed  # this template adds no default system prompt
    messages = [{"role": "system", "content": "Be brief."}, *CONVERSATION]
    assert render_go_template(parsed["TEMPLATE"], "Be brief.", messages) == jinja_render(folder, messages)
    assert render_go_template(parsed["TEMPLATE"], "", CONVERSATION) == jinja_render(folder, CONVERSATION)


def test_unknown_template_leaves_it_to_ollama_and_sampling_settings_become_parameters(tmp_path):
    folder = model_folder(tmp_path, "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    (folder / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.6,
                                                               "top_p": 0.9, "repetition_penalty": 1.1}))
    text = write_modelfile(folder / "merged-q4_k_m.gguf", folder).read_text()
    parsed = parse_modelfile(text)
    assert "TEMPLATE" not in parsed and "stop" not in parsed["PARAMETER"]
    assert parsed["PARAMETER"]["temperature"] == ["0.6"] and parsed["PARAMETER"]["top_p"] == ["0.9"]
    assert parsed["PARAMETER"]["repeat_penalty"] == ["1.1"]

