import json

import pytest

from conftest import alpaca_rows, write_jsonl
from snugtune.config import ConfigError, DataConfig
from snugtune.data import collate, prepare_data
from snugtune.data.formats import Row, detect_format
from snugtune.data.tokenize import IGNORE, tokenize_sample
from snugtune.models import load_tokenizer, resolve_model


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model("shape:tiny").path)


def trained_text(sample, tokenizer) -> str:
    return tokenizer.decode([t for t, lab in zip(sample.input_ids, sample.labels) if lab != IGNORE])


def test_alpaca_trains_on_the_answer_and_eos_only(tokenizer):
    sample = {"messages": [{"role": "user", "content": "Add 2 and 3."},
                           {"role": "assistant", "content": "The sum is 5."}]}
    tok = tokenize_sample(sample, tokenizer, "row")
    assert trained_text(tok, tokenizer) == "The sum is 5.<|im_end|>\n"
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.eos_token_id in [t for t, lab in zip(tok.input_ids, tok.labels) if lab != IGNORE]
    # the prompt rendered for inference is exactly the untrained prefix
    prompt = tokenizer.apply_chat_template(sample["messages"][:1], tokenize=False, add_generation_prompt=True)
    first_trained = next(i for i, lab in enumerate(tok.labels) if lab != IGNORE)
    assert tokenizer.decode(tok.input_ids[:first_trained]) == prompt


def test_multi_turn_trains_every_assistant_turn_and_nothing_else(tokenizer):
    sample = {"messages": [{"role": "system", "content": "Be brief."},
                           {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                           {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye!"}]}
    tok = tokenize_sample(sample, tokenizer, "row")
    assert trained_text(tok, tokenizer) == "Hello!<|im_end|>\nGoodbye!<|im_end|>\n"
    everything = tokenize_sample(sample, tokenizer, "row", train_on_prompt=True)
    assert everything.input_ids == tok.input_ids
    assert all(lab != IGNORE for lab in everything.labels)


def test_format_detection_reports_its_choice(tmp_path):
    rows = [Row("f:1", {"instruction": "a", "input": "", "output": "b"})]
    assert detect_format(rows).name == "alpaca"
    assert detect_format([Row("f:1", {"messages": []})]).name == "messages"
    assert detect_format([Row("f:1", {"text": "### Human: hi ### Assistant: yo"})]).name == "guanaco"
    assert detect_format([Row("f:1", {"problem": "1+1", "solution": "2"})]).name == "prompt-completion"
    with pytest.raises(ConfigError, match="set data.format"):
        detect_format([Row("f:1", {"foo": 1})])


def test_invalid_json_names_file_and_line(tmp_path, tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(alpaca_rows(1)[0]) + "\n{not json\n")
    with pytest.raises(ConfigError, match=r"bad.jsonl:2: invalid JSON"):
        prepare_data(DataConfig(path=str(path)), tokenizer, 128, 0)
    report = prepare_data(DataConfig(path=str(path), skip_bad_rows=True, eval_fraction=0.0), tokenizer, 128, 0).report
    assert report.dropped == {"invalid JSON": 1} and report.kept == 1


def test_missing_field_names_the_row(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "c", "outptu": "d"}])
    with pytest.raises(ConfigError, match=r"d.jsonl:2: missing field 'output'"):
        prepare_data(DataConfig(path=str(path), format="alpaca"), tokenizer, 128, 0)


def test_long_samples_are_truncated_or_dropped_and_counted(tmp_path, tokenizer):
    rows = alpaca_rows(10) + [{"instruction": "x " * 300, "input": "", "output": "y"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    dropped = prepare_data(DataConfig(path=str(path), too_long="drop", eval_fraction=0.0), tokenizer, 64, 0).report
    assert dropped.kept == 10 and dropped.dropped == {"longer than max_seq_len=64": 1}
    # truncation that cuts off the whole answer leaves nothing to train: dropped too, never trained on
    cut = prepare_data(DataConfig(path=str(path), eval_fraction=0.0), tokenizer, 64, 0).report
    assert cut.kept == 10 and sum(cut.dropped.values()) == 1


def test_collate_masks_padding_out_of_loss_and_attention(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(4))
    data = prepare_data(DataConfig(path=str(path), eval_fraction=0.0), tokenizer, 128, 0)
    batch = collate(data.train, tokenizer.pad_token_id)
    for i, sample in enumerate(data.train):
        n = len(sample.input_ids)
        assert batch["attention_mask"][i, :n].all() and not batch["attention_mask"][i, n:].any()
        assert (batch["labels"][i, n:] == IGNORE).all()
