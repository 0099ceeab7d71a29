import pytest

from conftest import alpaca_rows, prepare, trained_text, write_jsonl
from snugtune.errors import ConfigError
from snugtune.data.tokenize import IGNORE


def prompt_text(sample, tokenizer) -> str:
    return tokenizer.decode([t for t, lab in zip(sample.input_ids, sample.labels) if lab == IGNORE])


def test_sharegpt_guanaco_and_prompt_completion_train_only_the_answers(tmp_path, tokenizer):
    cases = {
        "sharegpt": {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q1"},
                                       {"from": "gpt", "value": "A1"}, {"from": "human", "value": "Q2"},
                                       {"from": "gpt", "value": "A2"}]},
        "guanaco": {"text": "### Human: Q1### Assistant: A1### Human: Q2### Assistant: A2"},
        "prompt-completion": {"prompt": "Q1", "completion": "A1"},
    }
    for fmt, row in cases.items():
        data = prepare(tokenizer, write_jsonl(tmp_path / f"{fmt}.jsonl", [row]))
        assert data.report.format == fmt
        expected = "A1<|im_end|>\n" + ("A2<|im_end|>\n" if fmt != "prompt-completion" else "")
        assert trained_text(data.train[0], tokenizer) == expected, fmt


def test_chatdoctor_capitalised_alpaca_keys(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "cd.jsonl", [{"### Instruction": "I", "### Input": "In", "### Output": "Out"}])
    data = prepare(tokenizer, path)
    assert data.report.format == "alpaca" and trained_text(data.train[0], tokenizer) == "Out<|im_end|>\n"


def test_alpaca_system_and_history_become_the_conversation_before_the_question(tmp_path, tokenizer):
    # LLaMA-Factory's alpaca format
    row = {"instruction": "And times three?", "input": "", "output": "15", "system": "You are a calculator.",
           "history": [["What is 2 plus 3?", "5"]]}
    sample = prepare(tokenizer, write_jsonl(tmp_path / "d.jsonl", [row])).train[0]
    assert prompt_text(sample, tokenizer) == (
        "<|im_start|>system\nYou are a calculator.<|im_end|>\n<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n"
        "<|im_start|>assistant\n<|im_start|>user\nAnd times three?<|im_end|>\n<|im_start|>assistant\n")
    assert trained_text(sample, tokenizer) == "5<|im_end|>\n15<|im_end|>\n"


def test_a_guanaco_preamble_is_kept_as_the_system_turn(tmp_path, tokenizer):
    text = ("A chat between a curious human and an assistant.### Human: Can you help?"
            "### Assistant: Of course.")
    sample = prepare(tokenizer, write_jsonl(tmp_path / "d.jsonl", [{"text": text}])).train[0]
    assert prompt_text(sample, tokenizer).startswith(
        "<|im_start|>system\nA chat between a curious human and an assistant.<|im_end|>\n<|im_start|>user\nCan you help?")
    assert trained_text(sample, tokenizer) == "Of course.<|im_end|>\n"


def test_a_blank_answer_is_removed_with_its_question_and_the_rest_of_the_conversation_kept(tmp_path, tokenizer):
    blank_middle = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " "},
                                 {"role": "user", "content": "Still there?"}, {"role": "assistant", "content": "Yes"}]}
    rows = alpaca_rows(3) + [{"instruction": "x", "input": "", "output": "   "}]
    data = prepare(tokenizer, write_jsonl(tmp_path / "d.jsonl", rows))
    assert data.report.kept == 3 and data.report.dropped == {"blank answer": 1}  # nothing left: dropped whole
    chat = prepare(tokenizer, write_jsonl(tmp_path / "c.jsonl", [blank_middle, {"messages": blank_middle["messages"][2:]}]))
    assert chat.report.kept == 2 and chat.report.dropped == {} and chat.report.blank_answers == 1
    assert chat.train[0] == chat.train[1]  # "Hi" and its blank answer are gone; "Still there?" / "Yes" trains
    assert all(trained_text(s, tokenizer) == "Yes<|im_end|>\n" for s in chat.train)


def test_content_given_as_a_list_of_text_parts_is_joined(tmp_path, tokenizer):
    row = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Line one."},
                                                     {"type": "text", "text": "Line two."}]},
                        {"role": "assistant", "content": [{"type": "text", "text": "Both read."}]}]}
    sample = prepare(tokenizer, write_jsonl(tmp_path / "d.jsonl", [row])).train[0]
    assert "Line one.\nLine two." in prompt_text(sample, tokenizer)
    assert trained_text(sample, tokenizer) == "Both read.<|im_end|>\n"


def test_sharegpt_rows_with_role_and_content_keys(tmp_path, tokenizer):
    row = {"conversations": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
    data = prepare(tokenizer, write_jsonl(tmp_path / "d.jsonl", [row]))
    assert data.report.format == "sharegpt" and trained_text(data.train[0], tokenizer) == "Hello!<|im_end|>\n"


def test_trl_conversational_prompt_completion(tmp_path, tokenizer):
    row = {"prompt": [{"role": "user", "content": "What color is the sky?"}],
           "completion": [{"role": "assistant", "content": "It is blue."}]}
    sample = prepare(tokenizer, write_jsonl(tmp_path / "d.jsonl", [row])).train[0]
    assert trained_text(sample, tokenizer) == "It is blue.<|im_end|>\n"


def test_system_prompt_option_fills_in_only_where_a_row_has_none(tmp_path, tokenizer):
    rows = [{"instruction": "Q", "output": "A"}, {"instruction": "Q", "output": "A", "system": "Own system."}]
    data = prepare(tokenizer, write_jsonl(tmp_path / "d.jsonl", rows), system_prompt="Answer in French.")
    prompts = sorted(prompt_text(s, tokenizer) for s in data.train)
    assert prompts[0].startswith("<|im_start|>system\nAnswer in French.<|im_end|>")
    assert prompts[1].startswith("<|im_start|>system\nOwn system.<|im_end|>")


def test_a_missing_field_names_the_row(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "c", "outptu": "d"}])
    with pytest.raises(ConfigError, match=r"d.jsonl:2: missing field 'output'"):
        prepare(tokenizer, path, format="alpaca")


def test_history_that_is_not_pairs_names_the_field(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b", "history": ["just text"]}])
    with pytest.raises(ConfigError, match=r"d.jsonl:1: field 'history' should be a list of \[question, answer\]"):
        prepare(tokenizer, path)


def test_openai_weight_zero_leaves_an_assistant_turn_untrained(tmp_path, tokenizer):
    row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey.", "weight": 0},
                        {"role": "user", "content": "Hello?"}, {"role": "assistant", "content": "Hello!", "weight": 1}]}
    sample = prepare(tokenizer, write_jsonl(tmp_path / "d.jsonl", [row])).train[0]
    assert trained_text(sample, tokenizer) == "Hello!<|im_end|>\n" and "Hey." in prompt_text(sample, tokenizer)
    row["messages"][1]["weight"] = 0.5
    with pytest.raises(ConfigError, match=r"d.jsonl:1: messages\[1\].weight should be 0 or 1"):
        prepare(tokenizer, write_jsonl(tmp_path / "d.jsonl", [row]))
