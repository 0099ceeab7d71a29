"""One conversation turn, as OpenAI, TRL, ShareGPT, Axolotl and LLaMA-Factory write it, made a message.

A message is {"role": system|user|assistant|tool, "content": str}, plus what the turn carries:
"tool_calls" on an assistant turn that calls functions (OpenAI's shape, arguments as an object: what
transformers' chat templates expect), "reasoning_content" (its reasoning trace), "name" (the speaker, or the
function a tool result answers), "tool_call_id", and "train": False on an assistant turn the loss leaves out.
"""

from __future__ import annotations

import json

from snugtune.errors import ConfigError

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "bot": "assistant",
         "chatgpt": "assistant", "model": "assistant", "system": "system", "tool": "tool", "function": "tool",
         "observation": "tool", "ipython": "tool", "function_call": "assistant"}
MEDIA_PARTS = ("image", "image_url", "input_image", "video", "video_url", "audio", "audio_url", "input_audio")
ROLE_KEYS, CONTENT_KEYS = ("role", "from"), ("content", "value")
REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")  # DeepSeek/Qwen3/vLLM, gpt-oss, OpenRouter
REASONING_PARTS = ("reasoning", "thinking")  # LLaMA-Factory's {"type": "reasoning", "value"}, Anthropic's thinking
REFUSED_KEYS = {"training_detail": "Axolotl's per-character training detail",
                "train_detail": "Axolotl's per-character training detail"}

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
    for key, what in REFUSED_KEYS.items():
        if turn.get(key) is not None:
            raise ConfigError(f"{where}: {at}.{key}: {what} is not supported; mark whole turns with "
                              f"train: true/false, or remove the field")
    speaker = str(turn[role_key]).lower()
    role = ROLES.get(speaker)
    if role is None:
        raise ConfigError(f"{where}: {at} has unknown role '{turn[role_key]}' (known: {', '.join(ROLES)})")
    if speaker == "function_call":  # ShareGPT (LLaMA-Factory): the call is the turn's JSON value
        result = {"role": "assistant", "content": "",
                  "tool_calls": [_tool_call(c, where, at) for c in _as_list(_json(turn[content_key], where, at))]}
        return _with_train_flag(result, turn, where, at)
    content, reasoning, part_calls = parts(turn.get(content_key), where, f"{at}.{content_key}")
    result = {"role": role, "content": content}
    calls = part_calls + [_tool_call(c, where, f"{at}.tool_calls") for c in _as_list(turn.get("tool_calls") or [])]
    reasoning += [turn[k] for k in REASONING_KEYS if isinstance(turn.get(k), str) and turn[k].strip()]
    if calls:
        if role != "assistant":
            raise ConfigError(f"{where}: {at} has tool calls but is not an assistant turn")
        result["tool_calls"] = calls
    if reasoning and role == "assistant":
        result["reasoning_content"] = "\n".join(reasoning)
    for extra in ("name", "tool_call_id"):
        if isinstance(turn.get(extra), str) and turn[extra].strip():
            result[extra] = turn[extra]
    return _with_train_flag(result, turn, where, at)


def _with_train_flag(result: dict, turn: dict, where: str, at: str) -> dict:
    """Per-turn loss flags: Axolotl's `train`, OpenAI's `weight` (0/1), LLaMA-Factory's `loss_weight`. Only
    assistant turns are trained: a flag asking to train another turn is refused, one leaving it out is moot."""
    flags = {}  # a null flag is none: Arrow (parquet) gives every turn of a column the fields any turn has
    if turn.get("train") is not None:
        if not isinstance(turn["train"], bool):
            raise ConfigError(f"{where}: {at}.train should be true or false, got {turn['train']!r}")
        flags["train"] = turn["train"]
    for key, source in (("weight", "OpenAI"), ("loss_weight", "LLaMA-Factory")):
        if turn.get(key) is not None and result["role"] == "assistant":
            if isinstance(turn[key], bool) or turn[key] not in (0, 1):
                raise ConfigError(f"{where}: {at}.{key} should be 0 or 1, got {turn[key]!r} ({source}'s per-turn "
                                  f"loss weight; snugtune trains a turn or leaves it out, it does not scale it)")
            flags[key] = turn[key] == 1
    if len(set(flags.values())) > 1:
        raise ConfigError(f"{where}: {at}: its loss flags disagree ({', '.join(f'{k}={turn[k]!r}' for k in flags)})")
    train = next(iter(flags.values()), None)
    if train and result["role"] != "assistant":
        raise ConfigError(f"{where}: {at}.train: true on a {result['role']} turn: snugtune trains assistant turns; "
                          f"set data.train_on_prompt: true to train every token")
    if train is False and result["role"] == "assistant":
        result["train"] = False
    return result


def trained(message: dict) -> bool:
    """An assistant turn whose tokens the loss covers."""
    return message["role"] == "assistant" and message.get("train", True)


def untrained(messages: list[dict]) -> list[dict]:
    """The same turns with every assistant turn left out of the loss (a prompt's earlier answers)."""
    return [{**m, "train": False} if m["role"] == "assistant" else m for m in messages]


def blank(message: dict) -> bool:
    """An answer with neither text nor a tool call (a reasoning trace alone answers nothing)."""
    return not message["content"].strip() and not message.get("tool_calls")


def parts(content, where: str, at: str) -> tuple[str, list[str], list[dict]]:
    """A turn's content: text, or a list of parts (OpenAI's {"type": "text", "text"}, LLaMA-Factory's
    {"type": "text" | "reasoning" | "tool_call", "value"}) as (text joined by newlines, reasoning, tool calls)."""
    if content is None:
        return "", [], []
    if isinstance(content, str):
        return content, [], []
    if not isinstance(content, list):
        raise ConfigError(f"{where}: {at} should be text or a list of parts, got {type(content).__name__}")
    texts, reasoning, calls = [], [], []
    for i, part in enumerate(content):
        kind = part.get("type", "text") if isinstance(part, dict) else type(part).__name__
        kind = kind if isinstance(kind, str) else type(kind).__name__  # a part's type that is no name
        value = next((part[k] for k in ("text", "value", kind) if isinstance(part.get(k), str)), None) \
            if isinstance(part, dict) else None
        if kind in MEDIA_PARTS:
            raise ConfigError(f"{where}: {at}[{i}] is an {kind} part: multimodal data; snugtune trains text models")
        if value is None or kind not in ("text", "tool_call") + REASONING_PARTS:
            raise ConfigError(f"{where}: {at}[{i}] should be a text part {{\"type\": \"text\", \"text\": ...}} "
                              f"(or LLaMA-Factory's {{\"type\": \"text\", \"value\": ...}})")
        if kind == "tool_call":
            calls.append(_tool_call(_json(value, where, f"{at}[{i}]"), where, f"{at}[{i}]"))
        else:
            (reasoning if kind in REASONING_PARTS else texts).append(value)
    return "\n".join(texts), reasoning, calls


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
