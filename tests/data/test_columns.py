import pytest

from conftest import prepare, trained_text, write_jsonl
from snugtune.config import DataConfig, config_from_dict
from snugtune.errors import ConfigError


def test_columns_map_a_files_names_to_the_format_fields(tmp_path, tokenizer):
    rows = [{"question": "Add 2 and 3.", "context": "Numbers.", "answer": "5", "id": 7}]
    data = prepare(tokenizer, write_jsonl(tmp_path / "d.jsonl", rows),
                   columns={"instruction": "question", "input": "context", "output": "answer"})
    assert data.report.format == "alpaca" and trained_text(data.train[0], tokenizer) == "5<|im_end|>\n"
    prompt = tokenizer.decode(data.train[0].input_ids)
    assert "Add 2 and 3.\n\nNumbers." in prompt and "7" not in prompt


def test_columns_rename_the_turn_keys_of_a_conversation(tmp_path, tokenizer):
    # Axolotl's field_messages + message_property_mappings, as data.columns
    rows = [{"dialog": [{"speaker": "user", "text": "Hi"}, {"speaker": "assistant", "text": "Hello!"}]}]
    data = prepare(tokenizer, write_jsonl(tmp_path / "d.jsonl", rows),
                   columns={"messages": "dialog", "role": "speaker", "content": "text"})
    assert data.report.format == "messages" and trained_text(data.train[0], tokenizer) == "Hello!<|im_end|>\n"


def test_a_mapped_column_missing_from_a_row_names_the_row_and_what_it_has(tmp_path, tokenizer):
    rows = [{"q": "a", "a": "b"}, {"q": "c", "answer": "d"}]
    with pytest.raises(ConfigError, match=r"d.jsonl:2: no column 'a' \(data.columns.output\); the row has q, answer"):
        prepare(tokenizer, write_jsonl(tmp_path / "d.jsonl", rows), columns={"instruction": "q", "output": "a"})


def test_an_unknown_field_in_columns_is_a_config_error():
    with pytest.raises(ConfigError, match=r"data.columns: unknown field 'answer' \(fields: chosen, rejected, .*instruction"):
        config_from_dict({"data": {"path": "d.jsonl", "columns": {"answer": "output"}}})
    assert DataConfig(path="d.jsonl", columns={"text": "code"}).columns == {"text": "code"}


def test_columns_map_onto_the_preference_fields_inside_single_message_answers_too(tmp_path, tokenizer):
    from snugtune.data.prepare import prepare_data
    rows = [{"q": [{"speaker": "human", "text": "Hi"}], "good": {"speaker": "bot", "text": "Hello."},
             "bad": {"speaker": "bot", "text": "Go away."}, "ok": "yes"}]
    config = DataConfig(path=str(write_jsonl(tmp_path / "d.jsonl", rows)), eval_fraction=0.0,
                        columns={"conversations": "q", "chosen": "good", "rejected": "bad", "role": "speaker",
                                 "content": "text"})
    pair = prepare_data(config, tokenizer, 128, 0, objective="dpo").train[0]
    assert tokenizer.decode(pair.chosen_ids) == "Hello.<|im_end|>\n" and "Hi" in tokenizer.decode(pair.prompt_ids)
    labelled = DataConfig(path=str(write_jsonl(tmp_path / "k.jsonl", [{"p": "Q", "c": "A", "ok": "yes"}])),
                          eval_fraction=0.0, columns={"prompt": "p", "completion": "c", "label": "ok"})
    assert prepare_data(labelled, tokenizer, 128, 0, objective="kto").train[0].desirable is True
