import pytest

from conftest import alpaca_rows, write_jsonl
from snugtune.config import DataConfig
from snugtune.data.prepare import prepare_data


def test_the_tokenized_cache_is_hit_on_the_second_run(tmp_path, tokenizer, monkeypatch):
    import snugtune.data.prepare as prepare_module
    path = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(8))
    config = DataConfig(path=str(path))
    first = prepare_data(config, tokenizer, 128, 0, cache_dir=tmp_path / "cache")
    assert first.report.cache == "miss"
    monkeypatch.setattr(prepare_module, "tokenize_sample", lambda *a, **k: pytest.fail("tokenized again"))
    second = prepare_data(config, tokenizer, 128, 0, cache_dir=tmp_path / "cache")
    assert second.report.cache == "hit"
    assert [s.input_ids for s in second.train] == [s.input_ids for s in first.train]
    # a changed file, max_seq_len or column mapping is a different key
    monkeypatch.undo()
    assert prepare_data(config, tokenizer, 64, 0, cache_dir=tmp_path / "cache").report.cache == "miss"
    mapped = DataConfig(path=str(path), columns={"output": "output"})
    assert prepare_data(mapped, tokenizer, 128, 0, cache_dir=tmp_path / "cache").report.cache == "miss"
    write_jsonl(path, alpaca_rows(9))
    assert prepare_data(config, tokenizer, 128, 0, cache_dir=tmp_path / "cache").report.cache == "miss"
