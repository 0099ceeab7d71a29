"""Every row format snugtune reads, as literal data: how rows are recognised, read, which fields they hold.

Adding a format: write its module under snugtune/data/formats/ (a `detect` and a `read`) and add one entry
here; data.format, format detection, data.columns and the report all read this table. Entries are in
detection order: a row takes the first format whose detector recognises it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from snugtune.data.formats import alpaca, conversation, guanaco, prompt_completion, text
from snugtune.data.rows import Row

TURN_FIELDS = ("role", "content")  # data.columns may rename these inside each turn of a conversation
CONVERSATION = "conversation"  # read() gives the turns: [{"role", "content", ...}], assistant turns trained
DOCUMENT = "document"  # read() gives one text, every token trained


@dataclass(frozen=True)
class DataFormat:
    detect: Callable[[dict], str | None]  # the row's fields (plain names) -> why they look like this format, or None
    read: Callable[[Row, dict], object]  # (row, its fields by plain name) -> what `produces` names
    fields: tuple[str, ...]  # the fields it reads, by the names data.columns maps a file's columns onto
    doc: str  # one line for the docs
    aliases: tuple[str, ...] = ()  # other spellings of its fields that it also reads
    turn_lists: tuple[str, ...] = ()  # fields that may hold a list of turns
    produces: str = CONVERSATION  # the kind of sample: CONVERSATION, DOCUMENT, or a kind detect.REFUSALS names
    gives_way_to: tuple[str, ...] = ()  # formats that win when other rows of the file vote for them


_EXTRAS = ("system", "tools")

FORMATS: dict[str, DataFormat] = {
    "alpaca": DataFormat(
        alpaca.detect, alpaca.read, ("instruction", "input", "output", "history") + _EXTRAS,
        "instruction (+ input) and output; LLaMA-Factory's system and history"),
    "messages": DataFormat(
        conversation.detect_messages, conversation.read_messages, ("messages",) + _EXTRAS,
        "OpenAI / TRL conversations: a `messages` list of {role, content} turns", turn_lists=("messages",)),
    "sharegpt": DataFormat(
        conversation.detect_sharegpt, conversation.read_sharegpt, ("conversations",) + _EXTRAS,
        "ShareGPT conversations: a `conversations` list of {from, value} turns", turn_lists=("conversations",)),
    "prompt-completion": DataFormat(
        prompt_completion.detect, prompt_completion.read, ("prompt", "completion") + _EXTRAS,
        "TRL prompt and completion, as text or lists of turns; only the completion is trained",
        aliases=("problem", "solution", "question", "answer"), turn_lists=("prompt", "completion")),
    "guanaco": DataFormat(
        guanaco.detect, guanaco.read, ("text", "tools"),
        "one `text` of `### Human:` / `### Assistant:` turns"),
    "text": DataFormat(
        text.detect, text.read, ("text",), "plain text or code, every token trained",
        aliases=("content", "code"), produces=DOCUMENT, gives_way_to=("guanaco",)),
}


def fields_read(name: str) -> set[str]:
    """Every row field the format reads (a column outside these is reported as not used)."""
    entry = FORMATS.get(name)
    return set(entry.fields + entry.aliases) if entry else set()


def column_fields() -> tuple[str, ...]:
    """The fields data.columns may map a column onto: every format's, then the turn fields."""
    fields = [f for entry in FORMATS.values() for f in entry.fields] + list(TURN_FIELDS)
    return tuple(dict.fromkeys(fields))


def turn_list_fields() -> tuple[str, ...]:
    """Fields that may hold a list of turns, inside which data.columns renames role and content."""
    return tuple(dict.fromkeys(f for entry in FORMATS.values() for f in entry.turn_lists))
