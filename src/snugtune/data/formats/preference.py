"""Preference rows: pairs of a chosen and a rejected answer (DPO, ORPO; KTO unpairs them) and labelled
completions (KTO), in the layouts TRL, LLaMA-Factory and Axolotl write. The layouts themselves are read by
data.preference_rows; here each kind is recognised, saying which layout the row is in."""

from __future__ import annotations

from snugtune.data.preference_rows import (CHOSEN_KEYS, COMPLETION_KEYS, CONVERSATION_KEYS, LABEL_KEYS,
                                           PROMPT_TEXT_KEYS, REJECTED_KEYS, first_key, is_true_or_false,
                                           to_labelled, to_pair)
from snugtune.data.rows import Row

PAIR_LAYOUTS = (  # a prompt column and who writes pairs with it, in the order to_pair reads them
    (("messages", "conversations"), "LLaMA-Factory sharegpt ranking, Axolotl chat_template"),
    (("instruction",), "LLaMA-Factory alpaca ranking, Axolotl chatml.argilla"),
    (("prompt",), "TRL, Axolotl chatml.prompt_pairs"),
    (("question",), "Axolotl chatml.intel"),
    (("input",), "Axolotl chatml.icr"),
)


def _answers(keys: dict) -> tuple[str, str] | None:
    chosen, rejected = first_key(keys, CHOSEN_KEYS), first_key(keys, REJECTED_KEYS)
    return (chosen, rejected) if chosen and rejected else None


def detect_pairs(keys: dict) -> str | None:
    """Pairs with their prompt in a column of its own."""
    answers = _answers(keys)
    if answers is None:
        return None
    for names, writers in PAIR_LAYOUTS:
        prompt = first_key(keys, names)
        if prompt:
            return f"rows have '{prompt}', '{answers[0]}' and '{answers[1]}' ({writers})"
    return None


def detect_implicit_pairs(keys: dict) -> str | None:
    """Pairs whose answers are whole conversations (or HH-RLHF texts) sharing the prompt."""
    answers = _answers(keys)
    if answers is None or first_key(keys, CONVERSATION_KEYS + ("instruction",) + PROMPT_TEXT_KEYS):
        return None
    return (f"rows have '{answers[0]}' and '{answers[1]}' and no prompt column: the prompt is what they share "
            f"(Anthropic HH-RLHF, UltraFeedback binarized)")


def detect_labelled(keys: dict) -> str | None:
    """A completion with a true/false label (a label column of other values, a class name, is not KTO's)."""
    label, answer = first_key(keys, LABEL_KEYS), first_key(keys, COMPLETION_KEYS + CONVERSATION_KEYS)
    if not (label and answer and is_true_or_false(keys[label])):
        return None
    return f"rows have '{answer}' and a true/false '{label}' (" + \
        ("LLaMA-Factory kto_tag" if label == "kto_tag" else "TRL unpaired preference") + ")"


def read_pair(row: Row, keys: dict):
    return to_pair(row)


def read_labelled(row: Row, keys: dict):
    return to_labelled(row)
