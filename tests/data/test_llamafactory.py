"""LLaMA-Factory data folders: dataset_info.json entries (file_name, formatting, columns, tags, num_samples)
read as LLaMA-Factory reads them, shaped like its data/README.md and data/dataset_info.json."""

import json

import pytest

from conftest import prepare, trained_text, write_jsonl
from snugtune.errors import ConfigError

ENTRIES = {
    "qa_alpaca": {"file_name": "qa.json", "columns": {"prompt": "question", "query": "context", "response": "answer",
                                                       "system": "persona"}},
    "chat_sharegpt": {"file_name": "chat.jsonl", "formatting": "sharegpt",
                      "columns": {"messages": "dialog", "system": "sys"},
                      "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "customer",
                               "assistant_tag": "agent"}},
    "c4_demo": {"file_name": "c4.jsonl", "columns": {"prompt": "text"}},
    "dpo_demo": {"file_name": "qa.json", "ranking": True, "columns": {"prompt": "question", "chosen": "a",
                                                                       "rejected": "b"}},
    "kto_demo": {"file_name": "qa.json", "columns": {"prompt": "question", "response": "answer", "kto_tag": "tag"}},
    "mm_demo": {"file_name": "qa.json", "formatting": "sharegpt", "columns": {"messages": "m", "images": "pics"}},
    "hub_entry": {"hf_hub_url": "llamafactory/alpaca_en"},
    "sampled": {"file_name": "qa.json", "num_samples": 2, "columns": {"prompt": "question", "response": "answer"}},
}


@pytest.fixture
def factory(tmp_path):
    """A LLaMA-Factory data folder: dataset_info.json beside the files it describes."""
    (tmp_path / "dataset_info.json").write_text(json.dumps(ENTRIES))
    (tmp_path / "qa.json").write_text(json.dumps([
        {"question": f"Add {i} and 1.", "context": "Integers.", "answer": f"{i + 1}", "persona": "A calculator."}
        for i in range(4)]))
    write_jsonl(tmp_path / "chat.jsonl", [{"sys": "Be kind.", "dialog": [
        {"speaker": "customer", "text": "My order is late."}, {"speaker": "agent", "text": "Sorry, it ships today."}]}])
    write_jsonl(tmp_path / "c4.jsonl", [{"text": "A document of plain text."}])
    return tmp_path


def test_an_alpaca_entry_maps_its_columns(factory, tokenizer):
    data = prepare(tokenizer, factory, dataset="qa_alpaca")
    assert data.report.format == "alpaca" and data.report.format_reason == "dataset_info.json entry 'qa_alpaca' " \
                                                                          "(formatting: alpaca)"
    sample = next(s for s in data.train if trained_text(s, tokenizer) == "1<|im_end|>\n")
    assert "A calculator." in tokenizer.decode(sample.input_ids) and "Add 0 and 1.\n\nIntegers." in tokenizer.decode(sample.input_ids)
    assert any("question -> instruction" in note for note in data.report.source_notes)


def test_a_sharegpt_entry_maps_its_columns_and_role_tags(factory, tokenizer):
    data = prepare(tokenizer, factory, dataset="chat_sharegpt")
    assert data.report.format == "sharegpt" and trained_text(data.train[0], tokenizer) == "Sorry, it ships today.<|im_end|>\n"
    text = tokenizer.decode(data.train[0].input_ids)
    assert "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nMy order is late." in text


def test_a_pretraining_entry_reads_its_prompt_column_as_text(factory, tokenizer):
    data = prepare(tokenizer, factory, dataset="c4_demo")
    assert data.report.format == "text" and trained_text(data.train[0], tokenizer).startswith("A document of plain text.")


def test_num_samples_limits_the_rows_unless_max_samples_is_set(factory, tokenizer):
    assert prepare(tokenizer, factory, dataset="sampled").report.kept == 2
    assert prepare(tokenizer, factory, dataset="sampled", max_samples=3).report.kept == 3


def test_ranking_and_kto_tag_entries_are_preference_data_for_their_objectives(factory, tokenizer):
    from snugtune.config import DataConfig
    from snugtune.data.prepare import prepare_data
    (factory / "qa.json").write_text(json.dumps([
        {"question": f"Add {i} and 1.", "a": f"{i + 1}", "b": "No idea.", "answer": f"{i + 1}", "tag": i % 2 == 0}
        for i in range(4)]))
    config = lambda name: DataConfig(path=str(factory), dataset=name, eval_fraction=0.0)  # noqa: E731
    pairs = prepare_data(config("dpo_demo"), tokenizer, 128, 0, objective="dpo")
    assert pairs.report.format == "preference" and len(pairs.train) == 4
    assert {tokenizer.decode(p.rejected_ids) for p in pairs.train} == {"No idea.<|im_end|>\n"}
    labelled = prepare_data(config("kto_demo"), tokenizer, 128, 0, objective="kto")
    assert labelled.report.format == "kto" and sorted(r.desirable for r in labelled.train) == [False, False, True, True]
    with pytest.raises(ConfigError, match=r"holds preference pairs \(chosen/rejected\), but objective: sft"):
        prepare(tokenizer, factory, dataset="dpo_demo")


@pytest.mark.parametrize("entry, message", [
    ("mm_demo", r"entry 'mm_demo' has a 'images' column: multimodal data \(images\)"),
    ("hub_entry", r"entry 'hub_entry' reads llamafactory/alpaca_en from elsewhere \(hf_hub_url\); set data.path to it"),
    ("no_such", r"data.dataset: .*dataset_info.json has no entry 'no_such' \(it has qa_alpaca, chat_sharegpt, c4_demo"),
    (None, r"data.dataset: .*dataset_info.json describes 8 datasets \(qa_alpaca, .*\); set data.dataset to the one"),
])
def test_entries_snugtune_cannot_train_and_ambiguous_folders_are_refused_naming_the_entries(factory, tokenizer, entry,
                                                                                           message):
    with pytest.raises(ConfigError, match=message):
        prepare(tokenizer, factory, dataset=entry)


def test_a_folder_with_one_entry_needs_no_name_and_data_dataset_needs_a_dataset_info(tmp_path, tokenizer):
    (tmp_path / "dataset_info.json").write_text(json.dumps({"only": {"file_name": "chat.jsonl", "formatting": "sharegpt"}}))
    write_jsonl(tmp_path / "chat.jsonl", [{"conversations": [{"from": "human", "value": "Hi"},
                                                             {"from": "gpt", "value": "Hello."}]}])
    assert trained_text(prepare(tokenizer, tmp_path).train[0], tokenizer) == "Hello.<|im_end|>\n"
    assert trained_text(prepare(tokenizer, tmp_path / "dataset_info.json").train[0], tokenizer) == "Hello.<|im_end|>\n"
    (tmp_path / "plain").mkdir()
    write_jsonl(tmp_path / "plain" / "d.jsonl", [{"text": "x"}])
    with pytest.raises(ConfigError, match=r"data.dataset names an entry of LLaMA-Factory's dataset_info.json; .* has none"):
        prepare(tokenizer, tmp_path / "plain", dataset="only")
