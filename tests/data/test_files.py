import csv
import json

import pytest

from conftest import alpaca_rows, prepare, write_jsonl
from snugtune.config import DataConfig
from snugtune.errors import ConfigError
from snugtune.data.files import read_rows
from snugtune.data.rows import Skipped
from snugtune.data.tokenize import IGNORE


def _rows(path, **data):
    return list(read_rows(DataConfig(path=str(path), **data), Skipped()))


def test_invalid_json_names_file_and_line_or_is_skipped_and_counted(tmp_path, tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(alpaca_rows(1)[0]) + "\n{not json\n")
    with pytest.raises(ConfigError, match=r"bad.jsonl:2: invalid JSON"):
        prepare(tokenizer, path)
    report = prepare(tokenizer, path, skip_bad_rows=True).report
    assert report.dropped == {"invalid JSON": 1} and report.kept == 1


@pytest.mark.parametrize("content, message", [
    (b"", "the file is empty"),
    (b'{"instruction": "a", "output": 5}\n', "d.jsonl:1: field 'output' should be text, got int"),
    (b'{"instruction": "a", "output": "\xff\xfe"}\n', "d.jsonl:1: not UTF-8"),
    (b'["just", "a", "list"]\n', "d.jsonl:1: expected an object with fields"),
])
def test_bad_input_is_named_by_file_and_line(tmp_path, tokenizer, content, message):
    path = tmp_path / "d.jsonl"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        prepare(tokenizer, path, format="alpaca")


def _write_csv(path, rows, encoding="utf-8"):
    with path.open("w", newline="", encoding=encoding) as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_json_csv_parquet_and_saved_datasets_read_the_same_rows(tmp_path, tokenizer):
    import datasets
    rows = alpaca_rows(6)
    (tmp_path / "d.json").write_text(json.dumps(rows))
    _write_csv(tmp_path / "d.csv", rows)
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "saved"))
    reference = sorted(s.input_ids for s in prepare(tokenizer, write_jsonl(tmp_path / "d.jsonl", rows)).train)
    for name in ["d.json", "d.csv", "d.parquet", "saved"]:
        assert sorted(s.input_ids for s in prepare(tokenizer, tmp_path / name).train) == reference, name


def test_byte_order_marks_are_skipped_in_csv_json_jsonl_and_txt(tmp_path):
    rows = [{"instruction": "Add 1 and 2.", "input": "", "output": "3"},
            {"instruction": "Add 2 and 2.", "input": "", "output": "4"}]
    _write_csv(tmp_path / "excel.csv", rows, encoding="utf-8-sig")  # Excel's "CSV UTF-8"
    (tmp_path / "notepad.json").write_text(json.dumps(rows), encoding="utf-8-sig")
    (tmp_path / "notepad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8-sig")
    for name in ["excel.csv", "notepad.json", "notepad.jsonl"]:
        assert (tmp_path / name).read_bytes().startswith(b"\xef\xbb\xbf")
        assert [r.value for r in _rows(tmp_path / name)] == rows, name
    (tmp_path / "book.txt").write_text("Call me Ishmael.", encoding="utf-8-sig")
    assert [r.value for r in _rows(tmp_path / "book.txt")] == [{"text": "Call me Ishmael."}]


def test_csv_rows_are_named_by_their_line_even_after_a_multiline_field(tmp_path, tokenizer):
    path = tmp_path / "d.csv"
    path.write_text('instruction,input,output\n"two\nlines",,fine\nthird,,\n')
    assert [r.where.rsplit(":", 1)[1] for r in _rows(path)] == ["2", "4"]


def test_a_txt_file_is_one_document_and_a_folder_of_txt_one_document_each_never_truncated(tmp_path, tokenizer):
    folder = tmp_path / "books"
    folder.mkdir()
    long_text = " ".join(f"word{i}" for i in range(400))
    (folder / "a.txt").write_text(long_text)
    (folder / "b.txt").write_text("A short note.")
    data = prepare(tokenizer, folder, 64)
    assert data.report.format == "text" and data.report.kept == 2
    assert data.report.documents_split == 1 and data.report.chunks > 5 and not data.report.truncated
    assert len(data.train) == data.report.chunks + 1
    trained = sum(s.trained_tokens for s in data.train)
    whole = len(tokenizer(long_text)["input_ids"]) + len(tokenizer("A short note.")["input_ids"]) + 2  # + EOS each
    assert trained == whole  # every token of both documents is trained
    single = prepare(tokenizer, folder / "a.txt", 64)
    assert single.report.kept == 1 and single.report.chunks == data.report.chunks


def test_source_folders_train_every_token_and_end_with_eos(tmp_path, tokenizer):
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "a.py").write_text("def a():\n    return 1\n")
    (folder / "b.py").write_text("def b():\n    return 2\n")
    data = prepare(tokenizer, folder, format="text")
    assert data.report.kept == 2
    for sample in data.train:
        assert all(lab != IGNORE for lab in sample.labels) and sample.input_ids[-1] == tokenizer.eos_token_id


def test_a_saved_dataset_dict_reads_data_split(tmp_path):
    import datasets
    rows = alpaca_rows(4)
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "test": datasets.Dataset.from_list(rows[:1])}).save_to_disk(str(tmp_path / "saved"))
    assert [r.value for r in _rows(tmp_path / "saved", split="test")] == rows[:1]
    with pytest.raises(ConfigError, match=r"data.split: .* without a 'validation' split \(train, test\)"):
        _rows(tmp_path / "saved", split="validation")
