"""models/cache.py: the cache folder, and folders that appear in it whole or not at all."""

from snugtune.models.cache import default_cache_dir, staged_cache_folder


def test_the_cache_follows_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "snugtune"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "snugtune"


def test_a_staged_folder_appears_only_on_commit_and_the_first_writer_wins(tmp_path):
    target = tmp_path / "models" / "m"
    tmp, commit = staged_cache_folder(target)
    (tmp / "weights").write_text("first")
    assert not target.exists()
    assert commit() == target and (target / "weights").read_text() == "first"
    again, commit_again = staged_cache_folder(target)  # a second process that built the same folder
    (again / "weights").write_text("second")
    assert commit_again() == target and (target / "weights").read_text() == "first"
    assert sorted(p.name for p in target.parent.iterdir()) == ["m"]


def test_a_stale_staging_folder_of_a_killed_build_is_replaced(tmp_path):
    target = tmp_path / "m"
    stale, _ = staged_cache_folder(target)
    (stale / "half-written").write_text("x")
    fresh, commit = staged_cache_folder(target)
    assert fresh == stale and not list(fresh.iterdir())
    commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
