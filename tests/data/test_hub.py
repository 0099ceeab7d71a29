"""Hub datasets, offline: repositories laid out as on the hub (data files + a README whose YAML header
declares the configs) in a temporary folder, read through the same datasets.load_dataset path as an id."""

import json
from pathlib import Path

import pytest

from conftest import prepare, trained_text
from snugtune.config import load_config
from snugtune.errors import ConfigError


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """HF caches under tmp_path and offline mode, in this process and in the ones it starts."""
    import datasets
    import huggingface_hub
    env = {"HF_DATASETS_CACHE": str(tmp_path / "datasets-cache"), "HF_HUB_CACHE": str(tmp_path / "hub-cache"),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", Path(env["HF_DATASETS_CACHE"]))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return tmp_path


def hub_repo(root: Path, repo_id: str, configs: dict[str, dict[str, str]], files: dict[str, list[dict]]) -> Path:
    """A dataset repository as the hub lays it out: data files and README.md with `configs:` YAML."""
    import datasets
    folder = root / repo_id
    for name, rows in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".parquet"):
            datasets.Dataset.from_list(rows).to_parquet(str(folder / name))
        else:
            (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    header = ["---", "configs:"]
    for config, splits in configs.items():
        header += [f"- config_name: {config}", "  data_files:"]
        header += [f"  - split: {split}\n    path: {pattern}" for split, pattern in splits.items()]
    (folder / "README.md").write_text("\n".join(header + ["---", f"# {repo_id}", ""]))
    return folder


def chatdoctor(root: Path, n: int = 12) -> Path:
    rows = [{"instruction": "If you are a doctor, please answer the medical questions based on the patient's "
             "description.", "input": f"I have had a headache for {i} days.", "output": f"Rest and drink water ({i})."}
            for i in range(n)]
    return hub_repo(root, "lavita/ChatDoctor-HealthCareMagic-100k", {"default": {"train": "data/train-*.parquet"}},
                    {"data/train-00000-of-00001.parquet": rows})


def guanaco(root: Path) -> Path:
    rows = [{"text": f"### Human: Can you name prime number {i}?### Assistant: Prime number {i} is {p}."}
            for i, p in enumerate([2, 3, 5, 7, 11, 13, 17, 19])]
    return hub_repo(root, "timdettmers/openassistant-guanaco",
                    {"default": {"train": "openassistant_best_replies_train.jsonl",
                                 "test": "openassistant_best_replies_eval.jsonl"}},
                    {"openassistant_best_replies_train.jsonl": rows, "openassistant_best_replies_eval.jsonl": rows[:2]})


def github_code(root: Path, files: int = 1, per_file: int = 8) -> Path:
    def row(i):
        return {"code": f"def f{i}(x):\n    return x + {i}\n", "repo_name": "a/b", "path": f"f{i}.py",
                "language": "Python", "license": "mit", "size": 30}
    shards = {f"data/train-{k:05d}-of-{files:05d}.parquet": [row(k * per_file + i) for i in range(per_file)]
              for k in range(files)}
    return hub_repo(root, "codeparrot/github-code", {"all-all": {"train": "data/train-*.parquet"},
                                                     "Python-all": {"train": "data/train-*.parquet"}}, shards)


def competition_math(root: Path) -> Path:
    rows = [{"problem": f"What is ${i} + {i}$?", "level": "Level 1", "type": "Algebra",
             "solution": f"$${i} + {i} = \\boxed{{{2 * i}}}$$"} for i in range(10)]
    return hub_repo(root, "hendrycks/competition_math", {"default": {"train": "train.jsonl", "test": "test.jsonl"}},
                    {"train.jsonl": rows, "test.jsonl": rows[:3]})


CASES = {  # dataset shape, data settings, format, what the first sample trains
    "chatdoctor": (chatdoctor, {}, "alpaca", "Rest and drink water"),
    "guanaco": (guanaco, {}, "guanaco", "Prime number"),
    "github-code": (github_code, {"subset": "Python-all", "columns": {"text": "code"}}, "text", "def f"),
    "competition_math": (competition_math, {"columns": {"prompt": "problem", "completion": "solution"}},
                         "prompt-completion", "\\boxed{"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_datasets_laid_out_as_on_the_hub_load_in_their_format(offline_hub, tokenizer, name):
    make, settings, fmt, trained = CASES[name]
    data = prepare(tokenizer, make(offline_hub / "repos"), **settings)
    assert data.report.format == fmt
    assert all(trained in trained_text(s, tokenizer) for s in data.train)


def test_split_and_subset_are_chosen_and_a_wrong_one_lists_the_ones_there_are(offline_hub, tokenizer):
    folder = guanaco(offline_hub / "repos")
    assert prepare(tokenizer, folder, split="test").report.rows_read == 2
    with pytest.raises(ConfigError, match=r"data.split: .*Unknown split \"validation\".*'train', 'test'"):
        prepare(tokenizer, folder, split="validation")
    with pytest.raises(ConfigError, match=r"data.subset: .*'Rust-all' not found.*'all-all', 'Python-all'"):
        prepare(tokenizer, github_code(offline_hub / "repos"), subset="Rust-all", columns={"text": "code"})
    with pytest.raises(ConfigError, match=r"data.subset: .*Config name is missing. .*\['all-all', 'Python-all'\]$"):
        prepare(tokenizer, offline_hub / "repos" / "codeparrot" / "github-code", columns={"text": "code"})


def test_max_samples_streams_and_reads_only_that_many_rows(offline_hub, tokenizer):
    folder = github_code(offline_hub / "repos", files=4, per_file=500)
    data = prepare(tokenizer, folder, max_samples=20, subset="all-all", columns={"text": "code"})
    assert data.report.rows_read == 20 and data.report.kept == 20
    assert not list((offline_hub / "datasets-cache").rglob("*.arrow"))  # streamed: nothing converted or cached


def test_offline_a_cached_dataset_id_loads_and_a_missing_one_fails_naming_how_to_fetch_it(offline_hub, tokenizer):
    folder = chatdoctor(offline_hub / "repos")
    first = prepare(tokenizer, folder)  # what a first online run leaves in the datasets cache, under the id's name
    cache = offline_hub / "datasets-cache"
    (cache / "chat_doctor-health_care_magic-100k").rename(cache / "lavita___chat_doctor-health_care_magic-100k")
    by_id = prepare(tokenizer, "lavita/ChatDoctor-HealthCareMagic-100k")
    assert [s.input_ids for s in by_id.train] == [s.input_ids for s in first.train]
    with pytest.raises(ConfigError, match=r"dataset timdettmers/openassistant-guanaco is not in the local datasets "
                                          r"cache and HF_HUB_OFFLINE is set.*huggingface-cli download --repo-type "
                                          r"dataset timdettmers/openassistant-guanaco"):
        prepare(tokenizer, "timdettmers/openassistant-guanaco")


def test_a_config_keeps_a_dataset_id_but_resolves_a_local_path(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("data: {path: timdettmers/openassistant-guanaco}\n")
    assert load_config(config).data.path == "timdettmers/openassistant-guanaco"
    (tmp_path / "timdettmers" / "openassistant-guanaco").mkdir(parents=True)  # a local folder of that name wins
    assert load_config(config).data.path == str(tmp_path / "timdettmers" / "openassistant-guanaco")
    config.write_text("data: {path: data/train.jsonl}\n")  # a mistyped file is a file, not an id
    assert load_config(config).data.path == str(tmp_path / "data" / "train.jsonl")


def test_cli_offline_missing_dataset_is_exit_2_naming_it(offline_hub):
    from typer.testing import CliRunner
    from snugtune.cli import app
    config = offline_hub / "c.yaml"
    config.write_text("model: shape:tiny\ndata: {path: lavita/ChatDoctor-HealthCareMagic-100k, max_samples: 2000}\n")
    result = CliRunner().invoke(app, ["data", str(config)])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)  # a clean exit, no traceback
    assert "lavita/ChatDoctor-HealthCareMagic-100k is not in the local datasets cache" in result.output


def test_a_dataset_with_a_loading_script_is_refused_saying_what_to_do(offline_hub, tokenizer):
    folder = offline_hub / "repos" / "codeparrot" / "github-code"
    folder.mkdir(parents=True)
    (folder / "github-code.py").write_text("import datasets\n")
    (folder / "README.md").write_text("---\ndataset_info:\n  features: []\n---\n")
    with pytest.raises(ConfigError, match=r"scripts are no longer supported.*download its data files"):
        prepare(tokenizer, folder)
