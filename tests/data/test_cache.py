"""The tokenized cache: hit on a second run, replaces only entries it wrote."""

import pytest

from conftest import alpaca_rows, write_jsonl
from snugtune.config import DataConfig
from snugtune.data.cache import load_cached, store
from snugtune.data.prepare import prepare_data
from snugtune.data.tokenize import TokenizedSample


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


def test_the_cache_never_replaces_a_file_it_did_not_write(tmp_path):
    samples = [TokenizedSample([1, 2, 3], [-100, 2, 3])]
    (tmp_path / "users.json").write_text('{"mine": true}')
    store(tmp_path, "users", samples, [], {"rows": 1})
    assert (tmp_path / "users.json").read_text() == '{"mine": true}'
    assert load_cached(tmp_path, "users") is None  # and it is not taken for an entry either


def test_a_damaged_entry_of_its_own_is_rebuilt(tmp_path):
    samples = [TokenizedSample([1, 2, 3], [-100, 2, 3])]
    store(tmp_path, "k", samples, [], {"rows": 1})
    assert load_cached(tmp_path, "k") == (samples, [], {"rows": 1})
    entry = tmp_path / "k.json"
    entry.write_text(entry.read_text()[:60])  # cut short, as by a crash or a full disk
    assert load_cached(tmp_path, "k") is None
    store(tmp_path, "k", samples, samples, {"rows": 2})
    assert load_cached(tmp_path, "k") == (samples, samples, {"rows": 2})
