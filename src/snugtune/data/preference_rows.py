"""Preference rows in the layouts people have, each made one small dataclass: a PreferencePair (DPO, ORPO)
or a LabelledCompletion (KTO). Bad rows raise ConfigError naming file:row and the field.

Pairs: an answer each under `chosen` and `rejected` (Axolotl's argilla layouts: `chosen_response` and
`rejected_response`), as text, one message ({role, content} or ShareGPT's {from, value}) or a list of them.
The prompt is, by the first key present:
  messages | conversations   turns (Axolotl chat_template; LLaMA-Factory sharegpt ranking data)
  instruction (+ input, history)   LLaMA-Factory alpaca ranking data
  prompt | question | input   text or turns (TRL; Axolotl chatml.intel, .icr, .prompt_pairs, .argilla)
  none: implicit             chosen and rejected are whole conversations sharing their first turns (Anthropic
                             HH-RLHF, UltraFeedback binarized, Axolotl chatml.argilla_chat); the shared turns
                             are the prompt, as TRL's extract_prompt takes them
A `prompt` beside whole conversations (UltraFeedback binarized) must be their last shared user turn, and a
`messages` beside them the shared turns or the chosen conversation whole (UltraFeedback binarized's).
HH-RLHF's text conversations ("\\n\\nHuman: ... \\n\\nAssistant: ...") are read as turns; other text pairs
without a prompt share a prefix that ends at a word boundary. A pair whose two answers are the same raises
SameAnswers (the row is dropped and counted, not refused).

Labelled completions (KTO): a true/false `label` (TRL) or `kto_tag` (LLaMA-Factory) with `prompt` +
`completion` (text or turns), alpaca `instruction`/`input`/`output`, or `messages`/`conversations` whose
trailing assistant turns are the completion. A `system` column becomes the system turn of a prompt without
one; a `tools` column is kept for the chat template.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from snugtune.errors import ConfigError
from snugtune.data import turns
from snugtune.data.rows import MEDIA_KEYS, Row, plain_keys
from snugtune.data.formats import alpaca

PAIRS, LABELLED = "pairs", "labelled"  # the kinds of preference data (format_registry's `produces`)
CHOSEN_KEYS, REJECTED_KEYS = ("chosen", "chosen_response"), ("rejected", "rejected_response")
LABEL_KEYS = ("label", "kto_tag")
CONVERSATION_KEYS = ("messages", "conversations")
PROMPT_TEXT_KEYS = ("prompt", "question", "input")
COMPLETION_KEYS = ("completion", "output")
KIND_NAMES = {PAIRS: "preference pairs (chosen/rejected)", LABELLED: "labelled completions (KTO)",
              "sft": "supervised fine-tuning data (no chosen/rejected answers, no true/false label)"}
OBJECTIVES_OF_KIND = {PAIRS: ("dpo", "orpo", "kto"), LABELLED: ("kto",), "sft": ("sft",)}


class SameAnswers(ConfigError):
    """A pair whose chosen and rejected answers are the same: nothing to prefer (data.prepare drops it, counted)."""


@dataclass(frozen=True)
class PreferencePair:
    """A prompt (messages ending with the turn answered) and two answers to it (assistant turns, possibly with
    tool turns between them), the first preferred."""
    prompt: list[dict]
    chosen: list[dict]
    rejected: list[dict]
    tools: list[dict] | None = None


@dataclass(frozen=True)
class LabelledCompletion:
    """A prompt and one answer to it, judged desirable or not (KTO)."""
    prompt: list[dict]
    completion: list[dict]
    desirable: bool
    tools: list[dict] | None = None


def first_key(keys: dict, names: tuple[str, ...]) -> str | None:
    """The first of `names` that the row's fields (by plain name) hold a value for."""
    return next((name for name in names if keys.get(name) is not None), None)


def check_objective(kind: str, objective: str, where: str) -> None:
    """ConfigError when data of this kind ('pairs', 'labelled', 'sft') cannot train this objective."""
    if objective not in OBJECTIVES_OF_KIND[kind]:
        wanted = {"sft": "conversations or instructions with answers", "kto": "labelled completions or pairs",
                  "dpo": "preference pairs", "orpo": "preference pairs"}[objective]
        raise ConfigError(f"{where}: holds {KIND_NAMES[kind]}, but objective: {objective} trains on {wanted}; "
                          f"set objective to one of {', '.join(OBJECTIVES_OF_KIND[kind])} or use other data")


def check_labels_readable(rows: list[Row], objective: str) -> None:
    """Under kto, a file detected as supervised because its label column is not true/false (1.0, "good"): the first
    such row named, instead of the file called supervised data."""
    if objective != "kto":
        return
    for row in rows:
        keys = plain_keys(row.value) if isinstance(row.value, dict) else {}
        if first_key(keys, LABEL_KEYS):
            _label(keys, row)


def _refuse_media(row: Row, keys: dict) -> None:
    media = [k for k in MEDIA_KEYS if keys.get(k)]
    if media:
        raise ConfigError(f"{row.where}: multimodal data (a '{media[0]}' column): snugtune trains text models")


def _with_system(messages: list[dict], keys: dict, row: Row, system_prompt: str | None) -> list[dict]:
    """The row's `system` column (else the config's system prompt) as the first turn, unless one is there."""
    system = keys.get("system")
    if system is not None and not isinstance(system, str):
        raise ConfigError(f"{row.where}: field 'system' should be text, got {type(system).__name__}")
    system = system if system and system.strip() else system_prompt
    if system and (not messages or messages[0]["role"] != "system"):
        return [{"role": "system", "content": system}] + messages
    return messages


def _turn_list(value, row: Row, key: str, default_role: str) -> list[dict]:
    """Text (one turn of default_role), one message, or a list of messages."""
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    if isinstance(value, dict):
        return [turns.message(value, row.where, key)]
    if isinstance(value, list):
        return turns.conversation(value, row.where, key)
    raise ConfigError(f"{row.where}: field '{key}' should be text, a message or a list of messages, got "
                      f"{type(value).__name__}")


def _explicit_prompt(row: Row, keys: dict) -> list[dict] | None:
    """The prompt turns a row names outright (None: the prompt is implicit in its answers)."""
    conversation = first_key(keys, CONVERSATION_KEYS)
    if conversation:
        return turns.conversation(keys[conversation], row.where, conversation)
    if keys.get("instruction") is not None:  # alpaca: instruction + input (+ history) as formats reads them
        return alpaca.read(row, {**keys, "system": None, "output": ""})[:-1]
    text = first_key(keys, PROMPT_TEXT_KEYS)
    if text is None:
        return None
    hh = _hh_turns(keys[text]) if isinstance(keys[text], str) else None
    if hh and hh[-1] == {"role": "assistant", "content": ""}:  # HH-RLHF text ending "\n\nAssistant:"
        return hh[:-1]
    return _turn_list(keys[text], row, text, "user")


def _is_answer(messages: list[dict]) -> bool:
    return bool(messages) and messages[0]["role"] == "assistant"


def _check_answer(messages: list[dict], row: Row, key: str) -> list[dict]:
    """An answer is assistant turns, with tool results between them; it starts and ends with the assistant."""
    if not _is_answer(messages):
        raise ConfigError(f"{row.where}: field '{key}' should be the answer (assistant turns), but starts with a "
                          f"'{messages[0]['role'] if messages else 'no'}' turn")
    odd = next((m["role"] for m in messages if m["role"] not in ("assistant", "tool")), None)
    if odd or messages[-1]["role"] != "assistant":
        raise ConfigError(f"{row.where}: field '{key}' should be the answer (assistant turns, tool results between "
                          f"them), but holds a '{odd or messages[-1]['role']}' turn"
                          + (" at its end" if not odd else ""))
    return messages


_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]?")


def _hh_turns(text: str) -> list[dict] | None:
    """Anthropic HH-RLHF's "\\n\\nHuman: ...\\n\\nAssistant: ..." text as turns (None: not that shape)."""
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        return None
    return [{"role": "user" if speaker == "Human" else "assistant", "content": content.strip()}
            for speaker, content in zip(parts[1::2], parts[2::2])]


def _split_text_pair(chosen: str, rejected: str, row: Row) -> tuple[list[dict], list[dict], list[dict]]:
    """Text pairs without a prompt: the shared prefix, ended at a word boundary, is the prompt."""
    hh_chosen, hh_rejected = _hh_turns(chosen), _hh_turns(rejected)
    if hh_chosen and hh_rejected:
        return _split_conversations(hh_chosen, hh_rejected, row)
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    while shared > 0 and not chosen[shared - 1].isspace():  # never split a word between prompt and answer
        shared -= 1
    prompt, chosen_answer, rejected_answer = chosen[:shared].strip(), chosen[shared:].strip(), rejected[shared:].strip()
    if not (prompt and chosen_answer and rejected_answer):  # no shared words, or one text holds the other whole
        raise ConfigError(f"{row.where}: 'chosen' and 'rejected' share no prompt followed by two answers; give the "
                          f"prompt in a 'prompt' column")
    return ([{"role": "user", "content": prompt}], [{"role": "assistant", "content": chosen_answer}],
            [{"role": "assistant", "content": rejected_answer}])


def _split_conversations(chosen: list[dict], rejected: list[dict], row: Row):
    """Whole conversations: their shared first turns are the prompt, the rest the two answers."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if chosen == rejected:  # the same turns written apart (HH-RLHF text differing only in spaces)
        raise SameAnswers(f"{row.where}: 'chosen' and 'rejected' are the same conversation")
    if shared in (len(chosen), len(rejected)):
        raise ConfigError(f"{row.where}: 'chosen' and 'rejected' should be two conversations that end in different "
                          f"answers, but one holds the other whole")
    if not shared:
        raise ConfigError(f"{row.where}: 'chosen' and 'rejected' share no first turns (no prompt); give the prompt "
                          f"in a 'prompt' or 'messages' column")
    for answer, key in ((chosen[shared:], "chosen"), (rejected[shared:], "rejected")):
        if not _is_answer(answer):
            raise ConfigError(f"{row.where}: 'chosen' and 'rejected' differ from turn {shared + 1} on, a "
                              f"'{answer[0]['role']}' turn in '{key}': they should share the conversation up to "
                              f"the answer")
    return chosen[:shared], chosen[shared:], rejected[shared:]


def _check_prompt_matches(named: list[dict], shared: list[dict], chosen: list[dict], row: Row) -> None:
    """A prompt column beside whole conversations must say what they share (UltraFeedback's prompt column is
    the text of the last shared user turn), or be the chosen conversation whole (UltraFeedback's messages)."""
    users = [m for m in shared if m["role"] == "user"]
    same = named in (shared, chosen) or (len(named) == 1 and named[0]["role"] == "user" and users
                                         and named[0]["content"] == users[-1]["content"])
    if not same:
        raise ConfigError(f"{row.where}: the prompt column differs from the turns that 'chosen' and 'rejected' "
                          f"share; keep one of them (map it away with data.columns)")


_WRITTEN_TURNS = re.compile(r"""\s*\[\s*\{\s*["'](role|from|content|value)["']\s*:""")


def _refuse_written_turns(keys: dict, names: tuple[str, ...], row: Row) -> None:
    """Whole conversations given as text that is a list of turns written out (JSON or Python's repr, as a CSV cell
    holds them) would be split as one text into a garbled prompt and answers: refused, naming the field."""
    for name in names:
        if _WRITTEN_TURNS.match(keys[name]):
            raise ConfigError(f"{row.where}: '{name}' is a list of turns written as text (a CSV or TSV cell cannot "
                              f"hold a list); save the file as JSONL, JSON or parquet so the turns stay a list")


def _check_prompt(prompt: list[dict], row: Row) -> list[dict]:
    if not prompt or prompt[-1]["role"] not in ("user", "tool"):
        last = prompt[-1]["role"] if prompt else "nothing"
        raise ConfigError(f"{row.where}: the prompt should end with the turn answered (user or tool), but ends "
                          f"with {last}")
    return prompt


def to_pair(row: Row, system_prompt: str | None = None) -> PreferencePair:
    """One preference pair from a row of any pair layout (module docstring); ConfigError naming the row."""
    if not isinstance(row.value, dict):
        raise ConfigError(f"{row.where}: expected an object with fields, got {type(row.value).__name__}")
    keys = plain_keys(row.value)
    _refuse_media(row, keys)
    chosen_key, rejected_key = first_key(keys, CHOSEN_KEYS), first_key(keys, REJECTED_KEYS)
    if not (chosen_key and rejected_key):
        raise ConfigError(f"{row.where}: a preference pair needs 'chosen' and 'rejected' answers")
    if keys[chosen_key] == keys[rejected_key]:
        raise SameAnswers(f"{row.where}: '{chosen_key}' and '{rejected_key}' are the same")
    named = _explicit_prompt(row, keys)
    if isinstance(keys[chosen_key], str) and isinstance(keys[rejected_key], str) and named is None:
        _refuse_written_turns(keys, (chosen_key, rejected_key), row)
        prompt, chosen, rejected = _split_text_pair(keys[chosen_key], keys[rejected_key], row)
    else:
        chosen = _turn_list(keys[chosen_key], row, chosen_key, "assistant")
        rejected = _turn_list(keys[rejected_key], row, rejected_key, "assistant")
        prompt = named
        if named is None or not (_is_answer(chosen) and _is_answer(rejected)):
            whole_chosen = chosen
            prompt, chosen, rejected = _split_conversations(chosen, rejected, row)
            if named is not None:
                _check_prompt_matches(named, prompt, whole_chosen, row)
    prompt = _check_prompt(_with_system(prompt, keys, row, system_prompt), row)
    return PreferencePair(prompt, _check_answer(chosen, row, chosen_key), _check_answer(rejected, row, rejected_key),
                          turns.tools(keys.get("tools"), row.where))


_TRUE, _FALSE = ("true", "yes", "1"), ("false", "no", "0")


def _as_bool(value) -> bool | None:
    """true/false as JSON writes it, or as CSV text (true/false, yes/no, 1/0); None for anything else."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower() if isinstance(value, (str, int)) else None
    return text in _TRUE if text in _TRUE + _FALSE else None


def is_true_or_false(value) -> bool:
    return _as_bool(value) is not None


def _label(keys: dict, row: Row) -> bool:
    key = first_key(keys, LABEL_KEYS)
    value = _as_bool(keys.get(key))
    if value is None:
        raise ConfigError(f"{row.where}: field '{key}' should be true or false, got {keys.get(key)!r}")
    return value


def _split_last_answer(messages: list[dict], row: Row, key: str) -> tuple[list[dict], list[dict]]:
    """A conversation's trailing assistant turns (the judged answer) and the turns before them."""
    start = len(messages)
    while start > 0 and messages[start - 1]["role"] == "assistant":
        start -= 1
    if start == len(messages):
        raise ConfigError(f"{row.where}: '{key}' should end with the assistant's answer that the label judges")
    return messages[:start], messages[start:]


def to_labelled(row: Row, system_prompt: str | None = None) -> LabelledCompletion:
    """One labelled completion from a KTO row (module docstring); ConfigError naming the row."""
    if not isinstance(row.value, dict):
        raise ConfigError(f"{row.where}: expected an object with fields, got {type(row.value).__name__}")
    keys = plain_keys(row.value)
    _refuse_media(row, keys)
    if not first_key(keys, LABEL_KEYS):
        raise ConfigError(f"{row.where}: a KTO row needs a true/false 'label' (or 'kto_tag')")
    desirable = _label(keys, row)
    completion_key = first_key(keys, COMPLETION_KEYS)
    conversation = first_key(keys, CONVERSATION_KEYS)
    if completion_key:
        prompt = _explicit_prompt(row, keys)
        if prompt is None:
            raise ConfigError(f"{row.where}: field '{completion_key}' needs a prompt ('prompt' or 'instruction')")
        completion = _check_answer(_turn_list(keys[completion_key], row, completion_key, "assistant"), row,
                                   completion_key)
    elif conversation:
        prompt, completion = _split_last_answer(turns.conversation(keys[conversation], row.where, conversation),
                                                row, conversation)
    else:
        raise ConfigError(f"{row.where}: a KTO row needs a 'completion' (with 'prompt'), an 'output' (with "
                          f"'instruction') or a 'messages' conversation")
    prompt = _check_prompt(_with_system(prompt, keys, row, system_prompt), row)
    return LabelledCompletion(prompt, completion, desirable, turns.tools(keys.get("tools"), row.where))


def with_system_prompt(example: PreferencePair | LabelledCompletion, system_prompt: str | None):
    """The example with data.system_prompt as the first turn of a prompt that has no system turn."""
    if not system_prompt or example.prompt[0]["role"] == "system":
        return example
    return replace(example, prompt=[{"role": "system", "content": system_prompt}] + example.prompt)


def unpair(pair: PreferencePair) -> tuple[LabelledCompletion, LabelledCompletion]:
    """A pair as two KTO rows, its chosen answer desirable and its rejected one not (TRL's
    unpair_preference_dataset)."""
    return (LabelledCompletion(pair.prompt, pair.chosen, True, pair.tools),
            LabelledCompletion(pair.prompt, pair.rejected, False, pair.tools))
