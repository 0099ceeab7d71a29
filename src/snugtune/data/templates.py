"""The chat template a run trains with, what it can render, and rendering through it.

A model without a template gets one made of text its tokenizer already has: ChatML where its vocabulary
holds ChatML's tokens, else an Alpaca-style prompt ending each answer with EOS. ChatML's markers outside
the vocabulary would be trained as several sub-word pieces, and the tuned model would print them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from snugtune.config import DataConfig
from snugtune.errors import ConfigError

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Turns are separated before each prompt turn, so an answer's rendered text is its content and EOS only.
ALPACA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if not loop.first and message['role'] != 'assistant' %}{{ '\n\n' }}{% endif %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '\n\n### Response:\n' + message['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '\n\n### Response:\n' }}{% endif %}"
)
NAMED_TEMPLATES = {"chatml": CHATML_TEMPLATE, "alpaca": ALPACA_TEMPLATE}
_MARKER = re.compile(r"<\|[A-Za-z0-9_]+\|>")


def set_chat_template(tokenizer, data: DataConfig) -> str:
    """Give the tokenizer the template the run trains with (and saves); returns which one and why."""
    if data.chat_template:
        template, chosen = _override(data.chat_template), f"data.chat_template ({_short(data.chat_template)})"
    elif getattr(tokenizer, "chat_template", None):
        template, chosen = tokenizer.chat_template, "the model's own"
    elif {"<|im_start|>", "<|im_end|>"} <= set(tokenizer.get_vocab()):
        template, chosen = CHATML_TEMPLATE, "ChatML (the model has none; its vocabulary has ChatML's tokens)"
    else:
        template, chosen = ALPACA_TEMPLATE, ("Alpaca-style text + EOS (the model has none, and ChatML's tokens "
                                             "are not in its vocabulary)")
    missing = sorted(m for m in set(_MARKER.findall(template)) if m not in tokenizer.get_vocab())
    if missing:
        raise ConfigError(f"chat template ({chosen}): {', '.join(missing)} are not tokens of this model's "
                          f"vocabulary and would be trained as sub-word pieces; set data.chat_template: alpaca "
                          f"(or a template made of the model's own tokens)")
    tokenizer.chat_template = template
    return chosen


def _short(value: str) -> str:
    return value if len(value) <= 60 else value[:57] + "..."


def _override(value: str) -> str:
    if value.lower() in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[value.lower()]
    if "{{" in value or "{%" in value:
        return value
    path = Path(value)
    if not path.is_file():
        raise ConfigError(f"data.chat_template: {value} is not {', '.join(NAMED_TEMPLATES)}, a template file, "
                          f"or Jinja text")
    return path.read_text(encoding="utf-8-sig")


def render(tokenizer, messages: list[dict], add_generation_prompt: bool, tools: list | None, where: str) -> str:
    """The conversation as text (transformers renders templates in a sandboxed Jinja environment); the loss
    flag of a turn is ours, not the template's."""
    from jinja2 import TemplateError
    shown = [{k: v for k, v in m.items() if k != "train"} for m in messages]
    try:
        return tokenizer.apply_chat_template(shown, tools=tools, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except (TemplateError, TypeError) as exc:
        raise ConfigError(f"{where}: the chat template cannot render this conversation ({exc})") from None


def opening_prompt(tokenizer, tools: list | None, where: str) -> str:
    """What the template writes before the answer of a conversation that opens with the assistant (its
    header, and any default system turn): the text two such one-turn conversations share."""
    one, other = (render(tokenizer, [{"role": "assistant", "content": c}], False, tools, where) for c in "xy")
    return one[:next((i for i, (a, b) in enumerate(zip(one, other)) if a != b), min(len(one), len(other)))]


@dataclass(frozen=True)
class TemplateAbilities:
    """What the template renders of what a turn may carry (a template that silently leaves something out
    would train answers without what they answer)."""
    tools: bool
    tool_calls: bool
    tool_turns: bool
    reasoning_key: str | None  # the message key it renders reasoning from (Qwen3: reasoning_content, gpt-oss: thinking)
    names: bool  # a turn's speaker `name`
    same_role_runs: bool  # consecutive turns of one role (templates that raise on them need them merged)


_PROBE_CALL = {"role": "assistant", "content": "", "tool_calls": [
    {"type": "function", "function": {"name": "probe_fn_x7", "arguments": {"probe_arg_x7": 1}}}]}
_PROBE_TOOL = {"type": "function", "function": {"name": "probe_fn_x7", "description": "d",
                                                "parameters": {"type": "object", "properties": {}}}}
REASONING_KEYS = ("reasoning_content", "thinking")


def _renders(tokenizer, messages: list[dict], tools: list | None, *needles: str) -> bool:
    try:
        text = render(tokenizer, messages, False, tools, "probe")
    except ConfigError:
        return False
    return all(n in text for n in needles)


def template_abilities(tokenizer) -> TemplateAbilities:
    question, answer = {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}
    result = {"role": "tool", "name": "probe_fn_x7", "content": "probe_result_x7"}
    reasoning = [key for key in REASONING_KEYS
                 if _renders(tokenizer, [question, {**answer, key: "probe_reason_x7"}], None, "probe_reason_x7")]
    runs = [{"role": role, "content": f"probe_{role}{n}_x7"} for role in ("user", "assistant") for n in (1, 2)]
    return TemplateAbilities(
        tools=_renders(tokenizer, [question], [_PROBE_TOOL], "probe_fn_x7"),
        tool_calls=_renders(tokenizer, [question, _PROBE_CALL], None, "probe_fn_x7", "probe_arg_x7"),
        tool_turns=_renders(tokenizer, [question, _PROBE_CALL, result], None, "probe_result_x7"),
        reasoning_key=reasoning[0] if reasoning else None,
        names=_renders(tokenizer, [{**question, "name": "probe_name_x7"}, answer], None, "probe_name_x7"),
        same_role_runs=_renders(tokenizer, runs, None, *(m["content"] for m in runs)))


def fit_to_template(messages: list[dict], abilities: TemplateAbilities) -> tuple[list[dict], int]:
    """The turns as this template can render them, and how many were merged: reasoning under the key the
    template renders, or else written before the answer as <think>...</think> (as DeepSeek-R1's and
    LLaMA-Factory's data put it); consecutive turns of one role merged when the template refuses them."""
    placed = [_place_reasoning(m, abilities.reasoning_key) for m in messages]
    if abilities.same_role_runs:
        return placed, 0
    merged: list[dict] = []
    for message in placed:
        if merged and _mergeable(merged[-1], message):
            merged[-1] = {**merged[-1], "content": merged[-1]["content"] + "\n\n" + message["content"]}
        else:
            merged.append(message)
    return merged, len(placed) - len(merged)


def _place_reasoning(message: dict, key: str | None) -> dict:
    if "reasoning_content" not in message or key == "reasoning_content":
        return message
    rest = {k: v for k, v in message.items() if k != "reasoning_content"}
    if key:
        return {**rest, key: message["reasoning_content"]}
    return {**rest, "content": f"<think>\n{message['reasoning_content']}\n</think>\n\n{message['content']}"}


def _mergeable(first: dict, second: dict) -> bool:
    """Two turns of one role that read as one: plain text of user, system or assistant with the same loss flag."""
    plain = lambda m: set(m) <= {"role", "content", "train"}  # noqa: E731
    return first["role"] == second["role"] != "tool" and plain(first) and plain(second) \
        and first.get("train", True) == second.get("train", True)


def check_renderable(sample: dict, abilities: TemplateAbilities, where: str) -> None:
    """ConfigError naming the field when the sample uses tool data the template would not render."""
    messages = sample.get("messages", [])
    unsupported = [
        (bool(sample.get("tools")) and not abilities.tools, "field 'tools' (tool definitions)"),
        (any(m.get("tool_calls") for m in messages) and not abilities.tool_calls,
         "tool calls ('tool_calls', or ShareGPT's function_call turns)"),
        (any(m["role"] == "tool" for m in messages) and not abilities.tool_turns,
         "tool results ('tool' turns, or ShareGPT's observation turns)"),
    ]
    for missing, field in unsupported:
        if missing:
            raise ConfigError(f"{where}: {field}: the chat template does not render them, so they would be lost; "
                              f"set data.chat_template to a template that does (a tool-use model's), or remove them")
