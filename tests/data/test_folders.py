"""Folders holding several splits are read by data.split; anything in a folder that is not a regular file is
refused before it is read."""

import os
import subprocess
import sys

import pytest

from conftest import alpaca_rows, prepare, write_jsonl
from snugtune.config import DataConfig
from snugtune.data.sources import locate, read_source
from snugtune.errors import ConfigError


def instructions(folder, **data):
    config = DataConfig(path=str(folder), **data)
    source = locate(config)
    return sorted(r.value["instruction"] for r in read_source(source, config)[0]), source.notes


def split_rows(name: str, n: int = 2) -> list[dict]:
    return [{"instruction": f"{name} {i}", "output": "x"} for i in range(n)]


def hub_snapshot(folder):
    """A hub dataset downloaded without its README: parquet shards under data/, one set per split."""
    import datasets
    for split in ("train", "test"):
        (folder / "data").mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_list(split_rows(split)).to_parquet(str(folder / "data" / f"{split}-00000-of-00001.parquet"))
    return folder


LAYOUTS = {  # files -> the rows of the train split
    "train.jsonl / test.jsonl": {"train.jsonl": "train", "test.jsonl": "test"},
    "alpaca_train.json / alpaca_dev.json": {"alpaca_train.jsonl": "train", "alpaca_dev.jsonl": "validation"},
    "train/ and eval/ folders": {"train/part1.jsonl": "train", "eval/part1.jsonl": "test"},
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_folder_of_split_files_reads_data_split_and_names_what_it_left_out(tmp_path, layout):
    for name, split in LAYOUTS[layout].items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(tmp_path / name, split_rows(split))
    rows, notes = instructions(tmp_path)
    assert rows == ["train 0", "train 1"]
    assert len(notes) == 1 and notes[0].startswith("split 'train' of") and "left out:" in notes[0]
    others = sorted(set(LAYOUTS[layout].values()) - {"train"})
    assert instructions(tmp_path, split=others[0])[0] == [f"{others[0]} 0", f"{others[0]} 1"]


def test_a_hub_snapshot_without_a_card_reads_its_shards_of_data_split(tmp_path, tokenizer):
    folder = hub_snapshot(tmp_path / "snapshot")
    assert instructions(folder)[0] == ["train 0", "train 1"]
    assert instructions(folder, split="test")[0] == ["test 0", "test 1"]
    with pytest.raises(ConfigError, match=r"data.split: .*snapshot has no 'validation' split \(its shards make the "
                                          r"splits test, train\)"):
        instructions(folder, split="validation")
    assert prepare(tokenizer, folder).report.source_notes[0].startswith("split 'train' of snapshot (by shards)")


def test_files_that_name_no_split_are_all_read_and_source_folders_ignore_split_names(tmp_path):
    write_jsonl(tmp_path / "part1.jsonl", split_rows("a"))
    write_jsonl(tmp_path / "trainer_notes.jsonl", split_rows("b"))  # 'train' inside a word names no split
    assert instructions(tmp_path) == (["a 0", "a 1", "b 0", "b 1"], [])
    code = tmp_path / "code"
    code.mkdir()
    (code / "main.py").write_text("print(1)\n")
    (code / "test_main.py").write_text("assert True\n")
    config = DataConfig(path=str(code))
    assert len(read_source(locate(config), config)[0]) == 2


@pytest.mark.parametrize("special", ["fifo", "device", "broken link"])
def test_anything_in_a_data_folder_that_is_not_a_regular_file_is_refused(tmp_path, special):
    write_jsonl(tmp_path / "train.jsonl", alpaca_rows(2))
    odd = tmp_path / "odd.jsonl"
    if special == "fifo":
        os.mkfifo(odd)
    elif special == "device":
        odd.symlink_to("/dev/zero")
    else:
        odd.symlink_to(tmp_path / "gone.jsonl")
    with pytest.raises(ConfigError, match=r"data.path: .*odd.jsonl( is a FIFO| is a device|: cannot read it)"):
        locate(DataConfig(path=str(tmp_path)))


@pytest.mark.parametrize("special", ["fifo", "/dev/zero"])
def test_data_path_that_is_a_fifo_or_a_device_is_exit_2_at_once_not_a_hang(tmp_path, special):
    path = tmp_path / "d.jsonl"
    os.mkfifo(path) if special == "fifo" else path.symlink_to(special)
    config = tmp_path / "c.yaml"
    config.write_text(f"model: shape:tiny\ndata: {{path: {path}}}\n")  # the data command hashes data.path for its cache
    done = subprocess.run([sys.executable, "-m", "snugtune", "data", str(config)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2, done.stderr
    said = f"{path} is a FIFO" if special == "fifo" else "data.path: /dev/zero is a device"  # the config resolves links
    assert said in done.stderr
    assert "Traceback" not in done.stderr
