"""What the report says about each field the turns of a conversation carry: how it is used, or that it is not.

A field a real export carries is either used as its tool means it (trained, in the prompt, a loss flag) or
said out loud here, so that nothing is dropped silently.
"""

from __future__ import annotations

from snugtune.data.format_registry import FORMATS
from snugtune.data.rows import Row, plain_keys
from snugtune.data.turns import REASONING_KEYS, REASONING_PARTS

USES = {
    "role": "the turn's role", "from": "the turn's role (ShareGPT)",
    "content": "the turn's text", "value": "the turn's text (ShareGPT)",
    "tool_calls": "the assistant's tool calls, rendered by the chat template",
    "tool_call_id": "passed to the chat template",
    "weight": "OpenAI's loss flag on assistant turns: 0 not trained",
    "train": "Axolotl's loss flag: false not trained",
    "loss_weight": "LLaMA-Factory's loss weight on assistant turns: 0 not trained",
}


def turn_keys(rows: list[Row], fmt: str) -> list[str]:
    """Every key the turns of the rows carry, in order of first sight; a content part of a reasoning kind
    counts as a field of that name."""
    lists = FORMATS[fmt].turn_lists if fmt in FORMATS else ()
    seen: dict[str, None] = {}
    for row in rows:
        keys = plain_keys(row.value) if isinstance(row.value, dict) else {}
        for turn in (t for name in lists if isinstance(keys.get(name), list) for t in keys[name]):
            if isinstance(turn, dict):
                seen.update(dict.fromkeys(map(str, turn)))
                content = next((turn[k] for k in ("content", "value") if isinstance(turn.get(k), list)), [])
                seen.update(dict.fromkeys(p["type"] for p in content if isinstance(p, dict)
                                          and p.get("type") in REASONING_PARTS))
    return list(seen)


def turn_field_uses(keys: list[str], reasoning: str, reasoning_key: str | None, names_shown: bool) -> dict[str, str]:
    """Each per-turn field and what snugtune does with it."""
    if reasoning == "drop":
        thinking = "reasoning of assistant turns: left out (data.reasoning: drop)"
    elif reasoning_key:
        thinking = f"reasoning of assistant turns: trained, rendered by the chat template as {reasoning_key}"
    else:
        thinking = ("reasoning of assistant turns: trained, written before the answer as <think>...</think> "
                    "(the chat template has no place for it)")
    name = ("the speaker's name: shown by the chat template" if names_shown else
            "the speaker's name: not shown by the chat template, so not used (a tool result's is passed on)")
    uses = {**USES, **dict.fromkeys(REASONING_KEYS + REASONING_PARTS, thinking), "name": name}
    return {key: uses.get(key, "not used") for key in keys}
