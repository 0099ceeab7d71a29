"""data/preference_tokenize.py: pairs and KTO rows through the chat template, and fitted to max_seq_len.
(Token for token against TRL's DPOTrainer and KTOTrainer: tests/test_preference_loss.py.)"""

import copy

import pytest

from snugtune.data.preference_rows import LabelledCompletion, PreferencePair
from snugtune.data.preference_tokenize import (TokenizedCompletion, TokenizedPair, fit_completion, fit_pair,
                                               tokenize_labelled, tokenize_pair)
from snugtune.data.tokenize import IGNORE


def U(text):  # noqa: N802
    return {"role": "user", "content": text}


def A(text):  # noqa: N802
    return {"role": "assistant", "content": text}


def scored(ids, labels) -> list[int]:
    return [t for t, label in zip(ids, labels) if label != IGNORE]


def test_a_pair_shares_the_rendered_prompt_and_scores_only_each_answer(tokenizer):
    prompt = [{"role": "system", "content": "Be kind."}, U("q1"), A("earlier answer"), U("q2")]
    pair = tokenize_pair(PreferencePair(prompt, [A("good")], [A("not good at all")]), tokenizer, "f:1")
    assert tokenizer.decode(pair.prompt_ids) == tokenizer.apply_chat_template(prompt, tokenize=False,
                                                                              add_generation_prompt=True)
    assert tokenizer.decode(pair.chosen_ids) == "good<|im_end|>\n"
    assert tokenizer.decode(pair.rejected_ids) == "not good at all<|im_end|>\n"
    assert pair.chosen_labels == pair.chosen_ids and pair.rejected_labels == pair.rejected_ids


def test_an_answer_ends_with_eos_under_a_template_without_an_end_of_turn_token(tokenizer):
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
                           "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    pair = tokenize_pair(PreferencePair([U("Q")], [A("yes")], [A("no")]), plain, "f:1")
    # the space before the answer joins its first word's token ("Ġyes"), as it does at inference
    assert plain.decode(pair.prompt_ids + pair.chosen_ids) == "user: Q\nassistant: yes\n" + plain.eos_token
    assert plain.decode(pair.chosen_ids) == " yes\n" + plain.eos_token and pair.chosen_ids[-1] == plain.eos_token_id
    # and is scored: the answers diverge there (TRL scores from the divergence too)
    assert scored(pair.chosen_ids, pair.chosen_labels) == pair.chosen_ids
    assert scored(pair.rejected_ids, pair.rejected_labels) == pair.rejected_ids


def test_tool_results_inside_an_answer_are_context_not_scored(tokenizer):
    answer = [A("Let me add them."), {"role": "tool", "content": "RESULT 4"}, A("It is 4.")]
    pair = tokenize_pair(PreferencePair([U("2+2?")], answer, [A("5")]), tokenizer, "f:1")
    assert tokenizer.decode(scored(pair.chosen_ids, pair.chosen_labels)) == \
        "Let me add them.<|im_end|>\nIt is 4.<|im_end|>\n"
    assert "RESULT 4" in tokenizer.decode(pair.chosen_ids)


def test_a_kto_row_is_its_prompt_and_its_scored_completion(tokenizer):
    row = tokenize_labelled(LabelledCompletion([U("Q")], [A("maybe")], False), tokenizer, "f:1")
    assert tokenizer.decode(row.prompt_ids).endswith("<|im_start|>assistant\n") and row.desirable is False
    assert tokenizer.decode(scored(row.completion_ids, row.completion_labels)) == "maybe<|im_end|>\n"


PAIR = TokenizedPair([1, 2, 3], [4, 5, 6, 7], [4, 5, 6, 7], [8, 9], [8, 9])
FITS = [  # (pair, max_len, too_long, expected chosen ids, expected rejected ids; None: dropped)
    (PAIR, 7, "truncate", [4, 5, 6, 7], [8, 9]),  # fits exactly
    (PAIR, 6, "truncate", [4, 5, 6], [8, 9]),  # the longer answer loses its end (TRL's keep_start)
    (PAIR, 4, "truncate", [4], [8]),
    (PAIR, 6, "drop", None, None),
    (PAIR, 3, "truncate", None, None),  # the prompt fills max_len
    (PAIR, 2, "truncate", None, None),
    (TokenizedPair([1, 2, 3], [4, 5], [IGNORE, 5], [8], [8]), 4, "truncate", None, None),  # nothing scored is left
]


@pytest.mark.parametrize("pair, max_len, too_long, chosen, rejected", FITS)
def test_fit_pair_keeps_the_start_and_drops_what_cannot_be_scored(pair, max_len, too_long, chosen, rejected):
    fitted = fit_pair(pair, max_len, too_long)
    if chosen is None:
        assert fitted is None
        return
    assert fitted.prompt_ids == pair.prompt_ids and (fitted.chosen_ids, fitted.rejected_ids) == (chosen, rejected)
    assert fitted.chosen_labels == pair.chosen_labels[:len(chosen)]
    assert max(len(fitted.chosen_ids), len(fitted.rejected_ids)) + len(fitted.prompt_ids) <= max_len


@pytest.mark.parametrize("max_len, too_long, kept", [(6, "truncate", [4, 5, 6]), (5, "truncate", [4, 5]),
                                                     (5, "drop", None), (3, "truncate", None)])
def test_fit_completion_keeps_the_start_and_drops_what_cannot_be_scored(max_len, too_long, kept):
    row = TokenizedCompletion([1, 2, 3], [4, 5, 6], [4, 5, 6], True)
    fitted = fit_completion(row, max_len, too_long)
    assert (fitted.completion_ids if fitted else None) == kept
