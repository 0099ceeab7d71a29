"""One conversation turn, as OpenAI, TRL, ShareGPT and LLaMA-Factory write it, made a chat-template message.

A message is {"role": system|user|assistant|tool, "content": str}, plus "tool_calls" on an assistant turn
that calls functions (OpenAI's shape, arguments as an object: what transformers' chat templates expect),
"weight": 0 on an assistant turn not to train, and "name"/"tool_call_id" on a tool result.
"""

from __future__ import annotations

import json

from snugtune.errors import ConfigError

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "bot": "assistant",
         "chatgpt": "assistant", "model": "assistant", "system": "system", "tool": "tool", "function": "tool",
         "observation": "tool", "ipython": "tool", "function_call": "assistant"}
MEDIA_PARTS = ("image", "image_url", "input_image", "video", "video_url", "audio", "input_audio")
ROLE_KEYS, CONTENT_KEYS = ("role", "from"), ("content", "value")


def _first_key(turn: dict, keys: tuple[str, ...]) -> str | None:
    return next((k for k in keys if k in turn), None)


def conversation(turns, where: str, key: str) -> list[dict]:
    """Messages from a list of turns ({role, content} or ShareGPT's {from, value})."""
    if not isinstance(turns, list) or not turns:
        raise ConfigError(f"{where}: '{key}' should be a non-empty list of turns")
    return [message(turn, where, f"{key}[{i}]") for i, turn in enumerate(turns)]


def message(turn, where: str, at: str) -> dict:
    role_key, content_key = (_first_key(turn, ROLE_KEYS), _first_key(turn, CONTENT_KEYS)) if isinstance(turn, dict) \
        else (None, None)
    if role_key is None or (content_key is None and "tool_calls" not in turn):
        raise ConfigError(f"{where}: {at} needs 'role' and 'content' (or ShareGPT's 'from' and 'value'); map other "
                          f"names with data.columns: {{role: ..., content: ...}}")
    speaker = str(turn[role_key]).lower()
    role = ROLES.get(speaker)
    if role is None:
        raise ConfigError(f"{where}: {at} has unknown role '{turn[role_key]}' (known: {', '.join(ROLES)})")
    if speaker == "function_call":  # ShareGPT (LLaMA-Factory): the call is the turn's JSON value
        return {"role": "assistant", "content": "",
                "tool_calls": [_tool_call(c, where, at) for c in _as_list(_json(turn[content_key], where, at))]}
    result = {"role": role, "content": text(turn.get(content_key), where, f"{at}.{content_key}")}
    if turn.get("tool_calls"):
        if role != "assistant":
            raise ConfigError(f"{where}: {at} has tool_calls but is not an assistant turn")
        result["tool_calls"] = [_tool_call(c, where, f"{at}.tool_calls") for c in _as_list(turn["tool_calls"])]
    for extra in ("name", "tool_call_id"):
        if role == "tool" and isinstance(turn.get(extra), str):
            result[extra] = turn[extra]
    if role == "assistant" and "weight" in turn:  # OpenAI's fine-tuning format: weight 0 = not trained
        if turn["weight"] not in (0, 1):
            raise ConfigError(f"{where}: {at}.weight should be 0 or 1, got {turn['weight']!r}")
        result.update({"weight": 0} if turn["weight"] == 0 else {})
    return result


def trained(message: dict) -> bool:
    """An assistant turn whose tokens the loss covers."""
    return message["role"] == "assistant" and message.get("weight", 1) != 0


def text(content, where: str, at: str) -> str:
    """A turn's text: a string, or a list of parts ([{"type": "text", "text": ...}]) joined by newlines."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ConfigError(f"{where}: {at} should be text or a list of parts, got {type(content).__name__}")
    pieces = []
    for i, part in enumerate(content):
        kind = part.get("type", "text") if isinstance(part, dict) else type(part).__name__
        if kind in MEDIA_PARTS:
            raise ConfigError(f"{where}: {at}[{i}] is an {kind} part: multimodal data; snugtune trains text models")
        if kind != "text" or not isinstance(part.get("text"), str):
            raise ConfigError(f"{where}: {at}[{i}] should be a text part {{\"type\": \"text\", \"text\": ...}}")
        pieces.append(part["text"])
    return "\n".join(pieces)


def _json(value, where: str, at: str):
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where}: {at} should be JSON ({exc.msg})") from None


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def _tool_call(call, where: str, at: str) -> dict:
    """OpenAI's {"type": "function", "function": {"name", "arguments"}} with arguments parsed from JSON text."""
    function = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise ConfigError(f"{where}: {at}: a tool call needs a function 'name' (and 'arguments')")
    arguments = _json(function.get("arguments", {}), where, f"{at}.arguments")
    result = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
    if isinstance(call.get("id"), str):
        result["id"] = call["id"]
    return result


def tools(value, where: str) -> list[dict] | None:
    """A row's 'tools' column (a list, or JSON text of one) as JSON-schema tool definitions."""
    if value in (None, "", []):
        return None
    listed = _json(value, where, "tools")
    if not isinstance(listed, list) or not all(isinstance(t, dict) for t in listed):
        raise ConfigError(f"{where}: 'tools' should be a list of function definitions")
    return [t if "function" in t else {"type": "function", "function": t} for t in listed]
