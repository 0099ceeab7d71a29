"""Rows of each supported format turned into one normalized sample.

A sample is {"messages": [...], "tools": [...] (optional)}, trained on its assistant turns, or {"text": str},
trained on every token. Bad rows raise ConfigError naming file:row and the field.
"""

from __future__ import annotations

import re

from snugtune.errors import ConfigError
from snugtune.data import turns
from snugtune.data.detect import PROMPT_COMPLETION_KEYS, plain_keys, refuse_kind
from snugtune.data.files import Row

TEXT_KEYS = ("text", "content", "code")


def _field(row: Row, keys: dict, *names: str, required: bool = True) -> str | None:
    for name in names:
        if keys.get(name) is not None:
            if not isinstance(keys[name], str):
                raise ConfigError(f"{row.where}: field '{name}' should be text, got {type(keys[name]).__name__}")
            return keys[name]
    if required:
        raise ConfigError(f"{row.where}: missing field '{names[0]}'")
    return None


def _system(row: Row, keys: dict) -> list[dict]:
    system = _field(row, keys, "system", required=False)
    return [{"role": "system", "content": system}] if system and system.strip() else []


def _text_pair(pair) -> bool:
    return isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(t, str) for t in pair)


def _alpaca(row: Row, keys: dict) -> list[dict]:
    """instruction + input -> the question, output -> the answer; LLaMA-Factory's system and history
    ([[question, answer], ...]) become the system turn and the earlier turns of the conversation."""
    instruction = _field(row, keys, "instruction")
    extra = _field(row, keys, "input", required=False) or ""
    history = keys.get("history") or []
    if not isinstance(history, list) or not all(_text_pair(pair) for pair in history):
        raise ConfigError(f"{row.where}: field 'history' should be a list of [question, answer] pairs")
    earlier = [{"role": role, "content": t} for pair in history for role, t in zip(("user", "assistant"), pair)]
    return _system(row, keys) + earlier + [
        {"role": "user", "content": f"{instruction}\n\n{extra}" if extra.strip() else instruction},
        {"role": "assistant", "content": _field(row, keys, "output")}]


def _side(row: Row, keys: dict, name: str, role: str) -> list[dict]:
    """A prompt or completion: text, or (TRL's conversational form) a list of messages."""
    if isinstance(keys.get(name), list):
        return turns.conversation(keys[name], row.where, name)
    return [{"role": role, "content": _field(row, keys, name)}]


def _prompt_completion(row: Row, keys: dict) -> list[dict]:
    for p, c in PROMPT_COMPLETION_KEYS:
        if p in keys:
            return _system(row, keys) + _side(row, keys, p, "user") + _side(row, keys, c, "assistant")
    raise ConfigError(f"{row.where}: missing field 'prompt' (or problem/question)")


def _turns(row: Row, keys: dict, key: str) -> list[dict]:
    messages = turns.conversation(keys.get(key), row.where, key)
    return messages if messages[0]["role"] == "system" else _system(row, keys) + messages


def _messages(row: Row, keys: dict) -> list[dict]:
    return _turns(row, keys, "messages")


def _sharegpt(row: Row, keys: dict) -> list[dict]:
    return _turns(row, keys, "conversations")


_GUANACO_TURN = re.compile(r"###\s*(Human|Assistant):", re.IGNORECASE)


def _guanaco(row: Row, keys: dict) -> list[dict]:
    """`### Human:` / `### Assistant:` turns; text before the first marker is the system turn (context)."""
    parts = _GUANACO_TURN.split(_field(row, keys, "text"))
    if len(parts) < 3:
        raise ConfigError(f"{row.where}: no '### Human:' / '### Assistant:' turns in 'text'")
    messages = [{"role": "system", "content": parts[0].strip()}] if parts[0].strip() else []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        messages.append({"role": "user" if speaker.lower() == "human" else "assistant", "content": content.strip()})
    return messages


CONVERSATION_READERS = {"alpaca": _alpaca, "prompt-completion": _prompt_completion,
                        "messages": _messages, "sharegpt": _sharegpt,
                        "guanaco": _guanaco}


def to_sample(row: Row, fmt: str, system_prompt: str | None = None) -> dict:
    """Normalize one raw row of format `fmt` (ConfigError naming the row and field if malformed or refused).
    system_prompt becomes the system turn of conversations that have none."""
    if not isinstance(row.value, dict):
        raise ConfigError(f"{row.where}: expected an object with fields, got {type(row.value).__name__}")
    refuse_kind(row)
    keys = plain_keys(row.value)
    if fmt == "text":
        return {"text": _field(row, keys, *TEXT_KEYS)}
    if fmt not in CONVERSATION_READERS:
        raise ConfigError(f"data.format: unknown format '{fmt}'")
    messages = CONVERSATION_READERS[fmt](row, keys)
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    tools = turns.tools(keys.get("tools"), row.where)
    return {"messages": messages, **({"tools": tools} if tools else {})}


def blank_turn(sample: dict) -> bool:
    """A sample with nothing to answer: empty text, or an assistant turn with neither text nor a tool call
    (training it would teach the model to end its turn at once)."""
    if "text" in sample:
        return not sample["text"].strip()
    answers = [m for m in sample["messages"] if turns.trained(m)]
    return not answers or any(not m["content"].strip() and not m.get("tool_calls") for m in answers)
