import csv
import json

import pytest

from conftest import alpaca_rows, prepare, write_jsonl
from snugtune.config import DataConfig
from snugtune.errors import ConfigError
from snugtune.data.sources import locate, read_source
from snugtune.data.tokenize import IGNORE


def _rows(path, **data):
    config = DataConfig(path=str(path), **data)
    return read_source(locate(config), config)[0]


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


def _gzip(path, data: bytes):
    import gzip
    path.write_bytes(gzip.compress(data))
    return path


def test_gz_tsv_and_csv_of_any_common_separator_read_the_same_rows(tmp_path):
    rows = [{"instruction": "Add 1; then 2, then 3.", "input": "", "output": "6"},
            {"instruction": "Say \"hi\" | twice.", "input": "", "output": "hi hi"}]
    lines = "".join(json.dumps(r) + "\n" for r in rows)
    _gzip(tmp_path / "d.jsonl.gz", lines.encode())
    _gzip(tmp_path / "d.json.gz", json.dumps(rows).encode())
    for name, separator in [("semi.csv", ";"), ("tab.tsv", "\t"), ("pipe.csv", "|"), ("comma.csv", ",")]:
        with (tmp_path / name).open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]), delimiter=separator)
            writer.writeheader()
            writer.writerows(rows)
    _gzip(tmp_path / "semi.csv.gz", (tmp_path / "semi.csv").read_bytes())
    for name in ["d.jsonl.gz", "d.json.gz", "semi.csv", "tab.tsv", "pipe.csv", "comma.csv", "semi.csv.gz"]:
        assert [r.value for r in _rows(tmp_path / name)] == rows, name


@pytest.mark.parametrize("separator", [";", "|", ","])
def test_the_sniffed_csv_separator_is_named_in_the_report(tmp_path, tokenizer, separator):
    path = tmp_path / "d.csv"
    path.write_text(f"instruction{separator}output\n" + "".join(f"Add {i} and 1.{separator}{i + 1}\n" for i in range(3)))
    report = prepare(tokenizer, path).report
    assert report.source_notes == [f"CSV separator {separator!r} (sniffed from the first lines)"] and report.kept == 3


def test_a_one_column_csv_and_quoted_separators_keep_the_comma(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('text\n"one; two; three"\n"four; five"\n')
    assert [r.value for r in _rows(path)] == [{"text": "one; two; three"}, {"text": "four; five"}]


JSON_FILES = {  # the file's JSON -> the rows read, or the error
    "rows under one key": ({"version": 2, "data": [{"text": "a"}, {"text": "b"}]}, ["a", "b"]),
    "splits under keys": ({"train": [{"text": "a"}], "test": [{"text": "t"}]}, ["a"]),
    "two lists of rows": ({"questions": [{"text": "a"}], "answers": [{"text": "b"}]},
                          r"several lists of rows, under the keys 'questions', 'answers'; choose one with data.split"),
    "no list of rows": ({"name": "x", "size": 3}, r"expected a JSON list of rows, or an object holding one under a "
                                                  r"key \(its keys: 'name', 'size'\)"),
}


@pytest.mark.parametrize("case", list(JSON_FILES))
def test_json_rows_under_a_key_are_found_when_there_is_one_list_and_refused_naming_the_keys_when_not(tmp_path, tokenizer,
                                                                                                    case):
    content, expected = JSON_FILES[case]
    (tmp_path / "d.json").write_text(json.dumps(content))
    if isinstance(expected, str):
        with pytest.raises(ConfigError, match=r"d.json: " + expected):
            _rows(tmp_path / "d.json")
        return
    assert [r.value["text"] for r in _rows(tmp_path / "d.json")] == expected
    assert prepare(tokenizer, tmp_path / "d.json", format="text").report.source_notes[0].startswith("d.json: rows under the key")


@pytest.fixture
def small_limits(monkeypatch):
    """Limits of a few KiB, so that the tests write small files."""
    from snugtune.data import files
    monkeypatch.setattr(files, "MAX_ROW_BYTES", 1024)
    monkeypatch.setattr(files, "MAX_FILE_BYTES", 8192)
    monkeypatch.setattr(files, "MAX_WHOLE_FILE_BYTES", 4096)


def test_a_line_over_the_row_limit_is_exit_2_naming_file_and_line_or_skipped_and_counted(tmp_path, tokenizer, small_limits):
    rows = alpaca_rows(2) + [{"instruction": "x" * 5000, "output": "y"}] + alpaca_rows(1)
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(ConfigError, match=r"d.jsonl:3: the line is over 1 KiB, the most snugtune reads as one row"):
        prepare(tokenizer, path)
    report = prepare(tokenizer, path, skip_bad_rows=True).report
    assert report.dropped == {"line too long": 1} and report.kept == 3


@pytest.mark.parametrize("name, content, message", [
    ("d.jsonl", b'{"text": "a"}\n' * 1000, r"d.jsonl: .*over the .* snugtune reads from one such file"),
    ("d.json", b'[' + b'{"text": "a"},' * 500 + b'{"text": "a"}]', r"d.json: .*over the .* snugtune reads"),
    ("bomb.jsonl.gz", None, r"bomb.jsonl.gz: more than .* of data, the most snugtune reads from one such file"),
    ("d.csv", b"text\n\"" + b"x" * 2000 + b"\"\n", r"d.csv:2: not a readable CSV row \(field larger than field limit"),
    ("broken.jsonl.gz", b"\x1f\x8b\x08\x00 not really gzip", r"broken.jsonl.gz: cannot read it"),
    ("broken.parquet", b"PAR1 not really parquet", r"broken.parquet: not a readable parquet file"),
])
def test_files_over_the_limits_or_damaged_are_exit_2_naming_them(tmp_path, small_limits, name, content, message):
    if name == "bomb.jsonl.gz":
        _gzip(tmp_path / name, b'{"text": "' + b"a" * 100_000 + b'"}\n')  # 100 KB from a few hundred bytes
    else:
        (tmp_path / name).write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        _rows(tmp_path / name)


def test_a_one_column_file_with_semicolons_keeps_its_commas_and_extra_fields_are_named(tmp_path, tokenizer):
    path = tmp_path / "d.csv"
    path.write_text("text;\nHello, world;\nA, B and C;\n".replace(";\n", "\n"))  # one column, commas inside
    assert [r.value for r in _rows(path)] == [{"text": "Hello, world"}, {"text": "A, B and C"}]
    path.write_text("instruction,output\nAdd 1 and 1.,2\nAdd 2, then 2.,4\n")  # an unquoted comma
    with pytest.raises(ConfigError, match=r"d.csv:3: 3 fields, the header has 2 \(separator ','; quote fields"):
        _rows(path)
    assert prepare(tokenizer, path, skip_bad_rows=True).report.dropped == {"more fields than the header": 1}
