"""Per-turn rules, on rows shaped like each tool's exports: what is trained, what is context, what is refused,
and what the report says about every field a turn carries."""

import copy

import pytest

from conftest import prepare, trained_text, write_jsonl
from snugtune.data.tokenize import IGNORE
from snugtune.errors import ConfigError


def prompt_text(sample, tokenizer) -> str:
    return tokenizer.decode([t for t, lab in zip(sample.input_ids, sample.labels) if lab == IGNORE])


def one(tokenizer, tmp_path, row, **data):
    """The prepared data of a one-row file (a copy of the tokenizer: a chat_template setting changes it)."""
    return prepare(copy.deepcopy(tokenizer), write_jsonl(tmp_path / "d.jsonl", [row]), **data)


def turn(role, content, **extra):
    return {"role": role, "content": content, **extra}


# A template that refuses two turns of one role in a row, as Llama-2's and Mistral's do
ALTERNATING = ("{% for m in messages %}{% if not loop.first and m['role'] == messages[loop.index0 - 1]['role'] %}"
               "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
               "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Templates with a place for reasoning (Qwen3's reasoning_content, gpt-oss's thinking) and for speaker names
REASONING = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m.reasoning_content %}<think>\n"
             "{{ m.reasoning_content }}\n</think>\n\n{% endif %}{{ m['content'] }}<|im_end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
THINKING = REASONING.replace("reasoning_content", "thinking")
NAMES = ("{% for m in messages %}<|im_start|>{{ m['role'] }}{% if m.name %} ({{ m.name }}){% endif %}{{ '\\n' }}"
         "{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_a_conversation_opening_with_the_assistant_trains_its_greeting(tmp_path, tokenizer):
    row = {"conversations": [{"from": "gpt", "value": "Hello! How can I help?"}, {"from": "human", "value": "Hi."},
                             {"from": "gpt", "value": "Nice to meet you."}]}
    sample = one(tokenizer, tmp_path, row).train[0]
    assert trained_text(sample, tokenizer) == "Hello! How can I help?<|im_end|>\nNice to meet you.<|im_end|>\n"
    assert prompt_text(sample, tokenizer).endswith("<|im_start|>assistant\n<|im_start|>user\nHi.<|im_end|>\n"
                                                   "<|im_start|>assistant\n")


def test_consecutive_turns_of_one_role_render_as_they_are_or_merge_for_a_template_that_refuses_them(tmp_path, tokenizer):
    row = {"messages": [turn("user", "Q1"), turn("user", "Q2"), turn("assistant", "A1"), turn("assistant", "A2")]}
    chatml = one(tokenizer, tmp_path, row)
    assert trained_text(chatml.train[0], tokenizer) == "A1<|im_end|>\nA2<|im_end|>\n" and chatml.report.merged_turns == 0
    strict = one(tokenizer, tmp_path, row, chat_template=ALTERNATING)
    assert trained_text(strict.train[0], tokenizer) == "A1\n\nA2<|im_end|>\n" and strict.report.merged_turns == 2
    assert "<|im_start|>user\nQ1\n\nQ2<|im_end|>" in prompt_text(strict.train[0], tokenizer)


def test_trl_prompt_completion_trains_the_completion_only_even_when_the_prompt_holds_answers(tmp_path, tokenizer):
    row = {"prompt": [turn("user", "What is 2+2?"), turn("assistant", "4."), turn("user", "And times 3?")],
           "completion": [turn("assistant", "12.")]}
    sample = one(tokenizer, tmp_path, row).train[0]
    assert trained_text(sample, tokenizer) == "12.<|im_end|>\n" and "<|im_start|>assistant\n4." in prompt_text(sample, tokenizer)


LOSS_FLAGS = {  # per-turn flags, each tool's way: the first answer left out, the second trained
    "Axolotl train": ({"train": False}, {"train": True}),
    "OpenAI weight": ({"weight": 0}, {"weight": 1}),
    "LLaMA-Factory loss_weight": ({"loss_weight": 0.0}, {"loss_weight": 1.0}),
}


@pytest.mark.parametrize("tool", list(LOSS_FLAGS))
def test_per_turn_loss_flags_leave_an_answer_in_the_context_untrained(tmp_path, tokenizer, tool):
    off, on = LOSS_FLAGS[tool]
    row = {"messages": [turn("user", "Hi", **{k: 0 for k in off if k != "train"}), turn("assistant", "Hey.", **off),
                        turn("user", "Hello?"), turn("assistant", "Hello!", **on)]}
    data = one(tokenizer, tmp_path, row)
    assert trained_text(data.train[0], tokenizer) == "Hello!<|im_end|>\n" and "Hey." in prompt_text(data.train[0], tokenizer)
    assert all("not trained" in data.report.turn_fields[key] for key in off)


def test_llamafactory_v1_rows_with_value_parts_and_loss_weights(tmp_path, tokenizer):
    # the shape of LLaMA-Factory's data/v1_sft_demo.jsonl
    row = {"messages": [{"role": "user", "content": [{"type": "text", "value": "Who are you?"}], "loss_weight": 0.0},
                        {"role": "assistant", "content": [{"type": "text", "value": "An assistant."}], "loss_weight": 1.0}]}
    assert trained_text(one(tokenizer, tmp_path, row).train[0], tokenizer) == "An assistant.<|im_end|>\n"


REFUSED = {
    "train: true on a user turn": ({"messages": [turn("user", "Hi", train=True), turn("assistant", "Hey.")]},
                                   r"messages\[0\].train: true on a user turn: snugtune trains assistant turns"),
    "train that is not a boolean": ({"messages": [turn("user", "Hi"), turn("assistant", "Hey.", train="yes")]},
                                    r"messages\[1\].train should be true or false"),
    "a fractional loss_weight": ({"messages": [turn("user", "Hi"), turn("assistant", "Hey.", loss_weight=0.5)]},
                                 r"messages\[1\].loss_weight should be 0 or 1, got 0.5 \(LLaMA-Factory's"),
    "flags that disagree": ({"messages": [turn("user", "Hi"), turn("assistant", "Hey.", train=True, weight=0)]},
                            r"messages\[1\]: its loss flags disagree \(train=True, weight=0\)"),
    "Axolotl's training_detail": (
        {"messages": [turn("user", "Hi"), turn("assistant", "Hey.", training_detail=[{"begin_offset": 0}])]},
        r"messages\[1\].training_detail: Axolotl's per-character training detail is not supported"),
    "an image part (LLaMA-Factory)": (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "value": "1.jpg"}]}, turn("assistant", "A cat.")]},
        r"messages\[0\].content\[0\] is an image_url part: multimodal data"),
    "a part of no known kind": ({"messages": [{"role": "user", "content": [{"type": "html", "value": "<b>"}]},
                                              turn("assistant", "Bold.")]},
                                r"messages\[0\].content\[0\] should be a text part"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_per_turn_fields_snugtune_cannot_honour_are_refused_naming_them(tmp_path, tokenizer, case):
    row, message = REFUSED[case]
    with pytest.raises(ConfigError, match=r"d.jsonl:1: " + message):
        one(tokenizer, tmp_path, row)


ANSWER = {"role": "assistant", "content": "4.", "reasoning_content": "2+2 is 4."}
REASONING_CASES = {  # (row's answer, data settings, trained text, what the report says)
    "inline where the template has no place": (ANSWER, {}, "<think>\n2+2 is 4.\n</think>\n\n4.<|im_end|>\n",
                                               "written before the answer as <think>"),
    "dropped on request": (ANSWER, {"reasoning": "drop"}, "4.<|im_end|>\n", "left out (data.reasoning: drop)"),
    "rendered by a Qwen3-like template": (ANSWER, {"chat_template": REASONING},
                                          "<think>\n2+2 is 4.\n</think>\n\n4.<|im_end|>\n", "as reasoning_content"),
    "gpt-oss's thinking key": ({"role": "assistant", "content": "4.", "thinking": "2+2 is 4."},
                               {"chat_template": THINKING}, "<think>\n2+2 is 4.\n</think>\n\n4.<|im_end|>\n",
                               "as thinking"),
    "LLaMA-Factory's reasoning part": ({"role": "assistant", "content": [{"type": "reasoning", "value": "2+2 is 4."},
                                                                        {"type": "text", "value": "4."}]},
                                       {}, "<think>\n2+2 is 4.\n</think>\n\n4.<|im_end|>\n", "written before"),
}


@pytest.mark.parametrize("case", list(REASONING_CASES))
def test_reasoning_is_trained_with_the_answer_or_dropped_as_data_reasoning_says(tmp_path, tokenizer, case):
    answer, settings, trained, said = REASONING_CASES[case]
    data = one(tokenizer, tmp_path, {"messages": [turn("user", "2+2?"), answer]}, **settings)
    assert trained_text(data.train[0], tokenizer) == trained
    assert any(said in use for use in data.report.turn_fields.values()), data.report.turn_fields


def test_speaker_names_go_into_the_prompt_where_the_template_shows_them_and_are_reported_where_not(tmp_path, tokenizer):
    row = {"messages": [turn("user", "Hi", name="Ada"), turn("assistant", "Hello Ada.")]}
    shown = one(tokenizer, tmp_path, row, chat_template=NAMES)
    assert "<|im_start|>user (Ada)\nHi" in prompt_text(shown.train[0], tokenizer)
    assert shown.report.turn_fields["name"] == "the speaker's name: shown by the chat template"
    hidden = one(tokenizer, tmp_path, row)
    assert "Ada" not in prompt_text(hidden.train[0], tokenizer)
    assert hidden.report.turn_fields["name"].startswith("the speaker's name: not shown by the chat template")


def test_every_per_turn_field_is_reported_as_used_or_not(tmp_path, tokenizer):
    row = {"messages": [turn("user", "Hi", timestamp="2024-01-01", name="Ada"),
                        turn("assistant", "Hey.", weight=1, reasoning_content="Greet back.")]}
    fields = one(tokenizer, tmp_path, row).report.turn_fields
    assert set(fields) == {"role", "content", "timestamp", "name", "weight", "reasoning_content"}
    assert fields["timestamp"] == "not used" and fields["weight"].startswith("OpenAI's loss flag")


def test_a_loss_flag_that_is_null_is_no_flag_as_parquet_writes_turns_without_it(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq
    # Arrow gives every turn of a column the fields of all: a turn without `weight` or `train` reads back null
    rows = [{"messages": [turn("user", "Hi"), turn("assistant", "Hey.", weight=0, train=False),
                          turn("user", "Hello?"), turn("assistant", "Hello!")]},
            {"messages": [turn("user", "Q"), turn("assistant", "A.")]}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    data = prepare(copy.deepcopy(tokenizer), tmp_path / "d.parquet")
    assert sorted(trained_text(s, tokenizer) for s in data.train) == ["A.<|im_end|>\n", "Hello!<|im_end|>\n"]
