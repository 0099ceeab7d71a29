"""The tokenized cache: hit on a second run, replaces only entries it wrote, keyed by the code's version."""

import ast
import hashlib
import importlib
import inspect
import pkgutil

import pytest

import snugtune.data
from snugtune.data import cache

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


# Modules of snugtune.data that do not change tokens or labels (they run after the cache, or report)
NOT_TOKENIZING = {"snugtune.data", "snugtune.data.formats", "snugtune.data.batches", "snugtune.data.cache",
                  "snugtune.data.prep_report", "snugtune.data.preference_batches"}


def _code_hash(modules) -> str:
    """sha256 of the modules' code, comments, docstrings and layout aside."""
    h = hashlib.sha256()
    for name in modules:
        tree = ast.parse(inspect.getsource(importlib.import_module(name)))
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                    and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
        h.update(name.encode() + ast.dump(tree).encode())
    return h.hexdigest()


def test_the_code_that_tokenizes_is_versioned_in_the_cache_key():
    every = {m.name for m in pkgutil.walk_packages(snugtune.data.__path__, "snugtune.data.")} | {"snugtune.data"}
    assert every == set(cache.TOKENIZING_MODULES) | NOT_TOKENIZING, "list a new data module in one of the two"
    recorded = _code_hash(cache.TOKENIZING_MODULES)
    assert cache.DATA_CODE_HASH == recorded, (
        f"the code that reads, masks or tokenizes data changed: bump cache.DATA_CODE_VERSION (now "
        f"{cache.DATA_CODE_VERSION}) so that old cache entries are not served, and set DATA_CODE_HASH = {recorded!r}")


def test_a_new_code_hash_is_a_new_key(tmp_path, tokenizer, monkeypatch):
    config = DataConfig(path=str(write_jsonl(tmp_path / "d.jsonl", alpaca_rows(4))))
    assert prepare_data(config, tokenizer, 128, 0, cache_dir=tmp_path / "cache").report.cache == "miss"
    monkeypatch.setattr(cache, "DATA_CODE_HASH", "other code")
    assert prepare_data(config, tokenizer, 128, 0, cache_dir=tmp_path / "cache").report.cache == "miss"


def test_the_content_digest_follows_the_data_read_with_or_without_the_cache(tmp_path, tokenizer):
    folder = tmp_path / "splits"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", alpaca_rows(4))
    write_jsonl(folder / "test.jsonl", alpaca_rows(2))
    config = DataConfig(path=str(folder))
    digest = lambda **k: prepare_data(config, tokenizer, 128, 0, **k).content_digest  # noqa: E731
    first = digest()
    assert len(first) == 64 and digest(cache_dir=tmp_path / "c") == digest(cache_dir=tmp_path / "c") == first
    write_jsonl(folder / "test.jsonl", alpaca_rows(3))  # the split not read
    assert digest() == first
    write_jsonl(folder / "train.jsonl", alpaca_rows(5))
    assert digest() != first and digest(cache_dir=tmp_path / "c") == digest()


def test_a_hub_datasets_digest_is_of_its_rows():
    from snugtune.data.rows import Row
    from snugtune.data.sources import HUB_ID, DataSource, content_digest
    from snugtune.data.columns import ColumnMap
    source = DataSource(HUB_ID, "owner/name", [], "train", ColumnMap())
    rows = [Row("owner/name:row 1", {"text": "a"}), Row("owner/name:row 2", {"text": "b"})]
    assert content_digest(source, rows) == content_digest(source, list(rows))
    assert content_digest(source, rows) != content_digest(source, rows[:1])
