"""Every row format snugtune reads, as literal data: how rows are recognised, read, which fields they hold.

Adding a format: write its module under snugtune/data/formats/ (a `detect` and a `read`) and add one entry
here; data.format, format detection, data.columns and the report all read this table. Entries are in
detection order: a row takes the first format whose detector recognises it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from snugtune.data.formats import alpaca, conversation, guanaco, preference, prompt_completion, text
from snugtune.data.preference_rows import LABELLED, PAIRS
from snugtune.data.rows import Row

TURN_FIELDS = ("role", "content")  # data.columns may rename these inside each turn of a conversation
CONVERSATION = "conversation"  # read() gives the turns: [{"role", "content", ...}], assistant turns trained
DOCUMENT = "document"  # read() gives one text, every token trained
# PAIRS: read() gives a preference_rows.PreferencePair; LABELLED: a preference_rows.LabelledCompletion


@dataclass(frozen=True)
class DataFormat:
    detect: Callable[[dict], str | None]  # the row's fields (plain names) -> why they look like this format, or None
    read: Callable[[Row, dict], object]  # (row, its fields by plain name) -> what `produces` names
    fields: tuple[str, ...]  # the fields it reads, by the names data.columns maps a file's columns onto
    doc: str  # one line for the docs
    aliases: tuple[str, ...] = ()  # other spellings of its fields that it also reads
    turn_lists: tuple[str, ...] = ()  # fields that may hold a list of turns
    produces: str = CONVERSATION  # the kind of sample: CONVERSATION, DOCUMENT, PAIRS or LABELLED
    gives_way_to: tuple[str, ...] = ()  # formats that win when other rows of the file vote for them


_EXTRAS = ("system", "tools")

_PROMPTS = ("prompt", "messages", "conversations", "instruction", "input", "history")

# the layouts KTO rows are in: a row of them without its label, in a file of labelled ones, is a KTO row to name
_KTO = ("kto",)

FORMATS: dict[str, DataFormat] = {
    # preference data first: its rows also hold the fields of the formats below (a prompt, an output)
    "preference": DataFormat(
        preference.detect_pairs, preference.read_pair, ("chosen", "rejected") + _PROMPTS + _EXTRAS,
        "preference pairs: `chosen` and `rejected` answers to a prompt column (TRL; LLaMA-Factory ranking and "
        "Axolotl layouts)", aliases=("chosen_response", "rejected_response", "question"),
        turn_lists=("chosen", "rejected", "prompt", "messages", "conversations"), produces=PAIRS),
    "preference-implicit": DataFormat(
        preference.detect_implicit_pairs, preference.read_pair, ("chosen", "rejected") + _EXTRAS,
        "preference pairs without a prompt column: `chosen` and `rejected` conversations share it (HH-RLHF, "
        "UltraFeedback)", aliases=("chosen_response", "rejected_response"), turn_lists=("chosen", "rejected"),
        produces=PAIRS, gives_way_to=("preference",)),
    "kto": DataFormat(
        preference.detect_labelled, preference.read_labelled, ("label", "completion", "output") + _PROMPTS + _EXTRAS,
        "labelled completions (KTO): an answer and a true/false `label` (TRL) or `kto_tag` (LLaMA-Factory)",
        aliases=("kto_tag", "question"), turn_lists=("completion", "prompt", "messages", "conversations"),
        produces=LABELLED),
    "alpaca": DataFormat(
        alpaca.detect, alpaca.read, ("instruction", "input", "output", "history") + _EXTRAS,
        "instruction (+ input) and output; LLaMA-Factory's system and history", gives_way_to=_KTO),
    "messages": DataFormat(
        conversation.detect_messages, conversation.read_messages, ("messages",) + _EXTRAS,
        "OpenAI / TRL conversations: a `messages` list of {role, content} turns", turn_lists=("messages",),
        gives_way_to=_KTO),
    "sharegpt": DataFormat(
        conversation.detect_sharegpt, conversation.read_sharegpt, ("conversations",) + _EXTRAS,
        "ShareGPT conversations: a `conversations` list of {from, value} turns", turn_lists=("conversations",),
        gives_way_to=_KTO),
    "prompt-completion": DataFormat(
        prompt_completion.detect, prompt_completion.read, ("prompt", "completion") + _EXTRAS,
        "TRL prompt and completion, as text or lists of turns; only the completion is trained",
        aliases=("problem", "solution", "question", "answer"), turn_lists=("prompt", "completion"),
        gives_way_to=_KTO),
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
