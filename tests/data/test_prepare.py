import pytest

from conftest import alpaca_rows, prepare, write_jsonl
from snugtune.errors import ConfigError


def test_long_samples_are_truncated_or_dropped_and_counted(tmp_path, tokenizer):
    rows = alpaca_rows(10) + [{"instruction": "x " * 300, "input": "", "output": "y"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    dropped = prepare(tokenizer, path, 64, too_long="drop").report
    assert dropped.kept == 10 and dropped.dropped == {"longer than max_seq_len=64": 1}
    # truncation that cuts off the whole answer leaves nothing to train: dropped too, never trained on
    cut = prepare(tokenizer, path, 64).report
    assert cut.kept == 10 and cut.dropped == {"no answer token within max_seq_len=64": 1}
    long_answer = alpaca_rows(3) + [{"instruction": "x", "input": "", "output": "y " * 300}]
    assert prepare(tokenizer, write_jsonl(tmp_path / "l.jsonl", long_answer), 64).report.truncated == 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_errors_name_the_first_bad_line_in_file_order_whatever_the_shuffle(tmp_path, tokenizer, seed):
    rows = alpaca_rows(60)
    rows[40] = {"instruction": "a", "output": 5}
    rows[12] = {"instruction": "b", "output": ["not", "text"]}
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(ConfigError, match=r"d.jsonl:13: field 'output' should be text"):
        _prepare_seeded(tokenizer, path, seed)


def _prepare_seeded(tokenizer, path, seed):
    from snugtune.config import DataConfig
    from snugtune.data.prepare import prepare_data
    return prepare_data(DataConfig(path=str(path)), tokenizer, 256, seed)


def test_max_samples_keeps_that_many_rows_and_the_split_holds_out_a_fraction(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(40))
    report = prepare(tokenizer, path, max_samples=20, eval_fraction=0.1).report
    assert (report.rows_read, report.kept, report.train_samples, report.eval_samples) == (40, 20, 18, 2)


def test_skip_bad_rows_counts_each_reason(tmp_path, tokenizer):
    rows = alpaca_rows(5) + [{"instruction": "a", "output": 5}, {"instruction": "b", "output": " "}]
    report = prepare(tokenizer, write_jsonl(tmp_path / "d.jsonl", rows), skip_bad_rows=True).report
    assert report.kept == 5 and report.dropped == {"malformed row": 1, "blank answer": 1}


def test_nothing_usable_is_an_error_saying_what_was_dropped(tmp_path, tokenizer):
    rows = [{"instruction": "a", "output": ""}, {"instruction": "b", "output": "  "}]
    with pytest.raises(ConfigError, match=r"no usable samples remain \(dropped: \{'blank answer': 2\}\)"):
        prepare(tokenizer, write_jsonl(tmp_path / "d.jsonl", rows))


def test_columns_the_format_does_not_read_are_reported(tmp_path, tokenizer):
    # a spreadsheet with the answer under another name: alpaca by its keys, and "answer_text" is said unused
    rows = [{"id": i, "instruction": "Add 1 and 1.", "output": "2", "answer_text": "Two."} for i in range(3)]
    report = prepare(tokenizer, write_jsonl(tmp_path / "d.jsonl", rows)).report
    assert report.format == "alpaca" and report.unused_columns == ["id", "answer_text"]
    chatdoctor = [{"### Instruction": "I", "### Input": "In", "### Output": "Out"}]
    assert prepare(tokenizer, write_jsonl(tmp_path / "c.jsonl", chatdoctor)).report.unused_columns == []


def test_a_giant_line_is_read_bounded_and_truncated_or_dropped_as_too_long_says(tmp_path, tokenizer):
    # 8 MB in one JSONL line: tokenized only as far as max_seq_len can reach, never whole
    rows = alpaca_rows(3) + [{"instruction": "Summarize: " + "x y " * 2_000_000, "output": "Done."},
                             {"instruction": "Write it out.", "output": "z " * 2_000_000}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    cut = prepare(tokenizer, path, 64).report
    assert cut.dropped == {"no answer token within max_seq_len=64": 1} and cut.truncated == 1 and cut.kept == 4
    assert prepare(tokenizer, path, 64, too_long="drop").report.dropped == {"longer than max_seq_len=64": 2}
