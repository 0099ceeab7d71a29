"""Hostile and odd inputs, tried systematically through the command line: configs, overrides, paths, signals,
a full disk, concurrent runs. Each case checks what a user would see: the exit code (2 bad input, 130
interrupted), one `error:` line on stderr, never a traceback, and nothing outside the run folder changed
(docs/reliability.md lists what is bounded and how)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import yaml
from typer.testing import CliRunner

from conftest import REPO_ROOT, alpaca_rows, write_jsonl
from snugtune.cli import app
from snugtune.config import config_from_dict, config_to_yaml
from snugtune.models.cache import default_cache_dir
from snugtune.rundir import LOCK, METRICS, RUN_MARK, complete_checkpoints, hold_run_lock

VALID = {"model": "shape:tiny", "data": {"path": "data.jsonl", "eval_fraction": 0.1}, "max_seq_len": 64,
         "lora": {"r": 4, "alpha": 8, "targets": "all-linear"}, "train": {"max_steps": 2, "micro_batch": 2},
         "save": {"every_steps": 100}, "output_dir": "runs/x", "device": "cpu"}
LONGEST_LINE = 1100  # an error line quotes at most a short prefix of any value


def _billion_laughs() -> str:
    lines = ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for level in range(8):
        name, previous = chr(ord("b") + level), chr(ord("a") + level)
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{previous}"] * 9) + "]")
    return "\n".join(lines) + "\n" + yaml.safe_dump(VALID)


def _valid(**changes) -> str:
    return yaml.safe_dump({**VALID, **changes})


def _old_run(folder: Path) -> Path:
    """A finished run's files as training wrote them before the run mark existed."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(config_to_yaml(config_from_dict({**VALID, "output_dir": str(folder)})))
    (folder / METRICS).write_text('{"step": 1, "loss": 2.0}\n')
    return folder


@dataclass
class Case:
    """One hostile input: the config file's text (or bytes), key=value overrides, more arguments, what the
    workspace holds before (prepare(work) -> the config path), and what the user must see."""
    config: str | bytes = field(default_factory=_valid)
    overrides: list[str] = field(default_factory=list)
    args: list[str] = field(default_factory=list)
    code: int = 2
    says: str = ""
    prepare: Callable[[Path], Path | None] = lambda work: None


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


CONFIGS = {
    "billion laughs": Case(_billion_laughs(), says="aliases expand to"),
    "an alias inside itself": Case("data: &d {path: data.jsonl, x: *d}\n", says="refers to itself"),
    "nested 20,000 deep": Case("data: " + "[" * 20_000 + "]" * 20_000, says="nested too deeply"),
    "2 MiB file": Case(_valid() + "#" + "x" * (2 << 20) + "\n", says="too large for a config"),
    "not UTF-8": Case(b"model: \xff\xfe\n", says="not UTF-8"),
    "binary garbage": Case(bytes(range(256)) * 8, says="c.yaml"),
    "a list, not a mapping": Case("- a\n- b\n", says="expected a mapping"),
    "empty file": Case("", says="missing required key 'data'"),
    "tabs": Case("data:\n\tpath: x\n", says="not valid YAML"),
    "a huge value": Case(_valid(method="q" * 500_000), says="characters)"),
    "a huge unknown key": Case(_valid(**{"k" * 100_000: 1}), says="c.yaml"),
    "lr = inf": Case(_valid(train={"lr": float("inf")}), says="train.lr: Input should be a finite number"),
    "lr = nan": Case(_valid(train={"lr": float("nan")}), says="train.lr"),
    "lr = 1e999 as text": Case(_valid(train={"lr": "1e999"}), says="train.lr"),
    "seed past 64 bits": Case(_valid(train={"seed": 2**70}), says="train.seed"),
    "negative seed": Case(_valid(train={"seed": -1}), says="train.seed"),
    "epochs = 1e300": Case(_valid(train={"epochs": 1e300}), says="train.epochs"),
    "max_steps past int64": Case(_valid(train={"max_steps": 2**63}), says="train.max_steps"),
    "max_seq_len = 0": Case(_valid(max_seq_len=0), says="max_seq_len"),
    "lora.alpha = inf": Case(_valid(lora={"alpha": float("inf")}), says="lora.alpha"),
    "dropout = 1": Case(_valid(lora={"dropout": 1.0}), says="lora.dropout"),
    "eval_fraction = nan": Case(_valid(data={"path": "data.jsonl", "eval_fraction": float("nan")}),
                                says="data.eval_fraction"),
    "output_dir ''": Case(_valid(output_dir=""), says="output_dir: must not be empty"),
    "output_dir with NUL": Case(_valid(output_dir="runs/\0x"), says="NUL"),
    "model ''": Case(_valid(model=" "), says="model: must not be empty"),
    "data.path ''": Case(_valid(data={"path": ""}), says="data.path: must not be empty"),
    "a section given as a number": Case(_valid(train=5), says="train"),
}

OVERRIDES = {
    "no =": Case(overrides=["train.lr"], says="not key=value"),
    "empty key": Case(overrides=["=1"], says="empty part"),
    "key ending in a dot": Case(overrides=["train.=1"], says="empty part"),
    "a value through a section": Case(overrides=["train.max_steps.x=1"], says="'max_steps' is not a section"),
    "lr = .inf": Case(overrides=["train.lr=.inf"], says="train.lr: Input should be a finite number"),
    "lr = 1e400": Case(overrides=["train.lr=1e400"], says="train.lr"),
    "seed = 2**70": Case(overrides=[f"train.seed={2**70}"], says="train.seed"),
    "an alias bomb": Case(overrides=["train.lr=&a [*a, *a]"] + ["data.x=&b [*b]"], says="refers to itself"),
    "nested 5,000 deep": Case(overrides=["train.lr=" + "[" * 5000], says="nested too deeply"),
    "a key 5,000 parts deep": Case(overrides=["a" + ".a" * 5000 + "=1"], says="nested too deeply"),
    "a huge value": Case(overrides=["method=" + "m" * 100_000], says="characters)"),
    "output_dir=''": Case(overrides=["output_dir="], says="output_dir: must not be empty"),
    "data replaced by a number": Case(overrides=["data=5"], says="data"),
}


def _config_path(kind: str) -> Callable[[Path], Path]:
    def prepare(work: Path) -> Path:
        return {"a folder": lambda: work,
                "a FIFO": lambda: _fifo(work / "pipe.yaml"),
                "missing": lambda: work / "nowhere.yaml",
                "a character device": lambda: Path("/dev/null"),
                "~ (the home folder's config)": lambda: Path("~/home-config.yaml")}[kind]()
    return prepare


CONFIG_PATHS = {
    "a folder": Case(prepare=_config_path("a folder"), says="not a regular file"),
    "a FIFO": Case(prepare=_config_path("a FIFO"), says="not a regular file"),
    "missing": Case(prepare=_config_path("missing"), says="config file not found"),
    "a character device": Case(prepare=_config_path("a character device"), says="not a regular file"),
    "~ expanded": Case(_valid(train={"lr": -1}), prepare=_config_path("~ (the home folder's config)"),
                       says="home-config.yaml: train.lr"),
}


def _output_dir(kind: str) -> Callable[[Path], None]:
    def prepare(work: Path) -> None:
        if kind == "a file":
            (work / "runs").mkdir()
            (work / "runs" / "x").write_text("mine")
        elif kind == "a link to a run":
            _old_run(work / "elsewhere")
            (work / "runs").mkdir()
            os.symlink(work / "elsewhere", work / "runs" / "x")
        elif kind == "a FIFO":
            (work / "runs").mkdir()
            os.mkfifo(work / "runs" / "x")
        elif kind == "a project folder":
            (work / "runs" / "x").mkdir(parents=True)
            (work / "runs" / "x" / "thesis.tex").write_text("mine")
    return prepare


FRESH = ["--fresh"]
PATHS = {
    "--fresh on /": Case(overrides=["output_dir=/"], args=FRESH, says="not a snugtune run"),
    "--fresh on the home folder (~)": Case(overrides=["output_dir=~/"], args=FRESH, says="not a snugtune run"),
    "--fresh on a project folder": Case(args=FRESH, prepare=_output_dir("a project folder"), says="not a snugtune run"),
    "--fresh on the current folder": Case(overrides=["output_dir=."], args=FRESH, prepare=lambda work: _old_run(work)
                                          and None, says="the current folder"),
    "--fresh on a file": Case(args=FRESH, prepare=_output_dir("a file"), says="not a plain folder"),
    "--fresh on a link to a run": Case(args=FRESH, prepare=_output_dir("a link to a run"), says="not a plain folder"),
    "--fresh on a FIFO": Case(args=FRESH, prepare=_output_dir("a FIFO"), says="not a plain folder"),
    "output_dir under a file": Case(overrides=["output_dir=data.jsonl/run"], says="data.jsonl"),
    "output_dir a project folder": Case(prepare=_output_dir("a project folder"), says="not a snugtune run"),
}


def _snapshot(root: Path, skip: Path | None) -> dict:
    """Every path under root (links not followed) with its type, and a file's size and modification time, but
    skip's (a folder's own time changes with what is put in it, which the listing shows)."""
    seen = {}
    for path in sorted(root.rglob("*")):
        if skip is not None and (path == skip or skip in path.parents):
            continue
        info = path.lstat()
        seen[str(path.relative_to(root))] = (info.st_mode, None, None) if path.is_dir() and not path.is_symlink() \
            else (info.st_mode, info.st_size, info.st_mtime_ns)
    return seen


@pytest.fixture
def workspace(tmp_path, monkeypatch) -> Path:
    """tmp/work (the current folder: data.jsonl, notes) and tmp/home (HOME, with a file of the user's); the
    model cache stays where it is."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(default_cache_dir().parent))
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    (home / "diary.txt").write_text("mine")
    (home / "home-config.yaml").write_text(_valid(train={"lr": -1}))
    work.mkdir()
    write_jsonl(work / "data.jsonl", alpaca_rows(16))
    (work / "notes.txt").write_text("mine")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    return tmp_path


def _write_config(work: Path, case: Case) -> Path:
    path = work / "c.yaml"
    path.write_bytes(case.config if isinstance(case.config, bytes) else case.config.encode("utf-8"))
    return path


def _check_the_user_sees_one_line(code: int, stderr: str, case: Case) -> None:
    assert code == case.code, stderr[-2000:]
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr[-2000:]
    assert case.says in errors[0] and len(errors[0]) < LONGEST_LINE, errors[0][:2000]


def _try(workspace: Path, case: Case) -> None:
    """The case through the CLI in this process: its exit code and error line; nothing outside
    work/runs/x changed, and work/runs/x itself unchanged when the case refused it."""
    work = workspace / "work"
    config = case.prepare(work) or _write_config(work, case)
    before = _snapshot(workspace, None)
    started = time.perf_counter()
    result = CliRunner().invoke(app, ["train", str(config), *case.overrides, "--quiet", *case.args])
    assert time.perf_counter() - started < 60
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    _check_the_user_sees_one_line(result.exit_code, result.stderr, case)
    assert _snapshot(workspace, None) == before  # refused: nothing created, moved, renamed or deleted


TABLES = {"config": CONFIGS, "override": OVERRIDES, "config path": CONFIG_PATHS, "output_dir": PATHS}


@pytest.mark.parametrize("kind, name", [(kind, name) for kind, table in TABLES.items() for name in table])
def test_a_hostile_input_is_one_line_and_changes_nothing(workspace, kind, name):
    _try(workspace, TABLES[kind][name])


def test_fresh_sets_a_run_aside_through_a_tilde_and_moves_nothing_else(workspace):
    home = workspace / "home"
    run = _old_run(home / "runs" / "x")
    config = _write_config(workspace / "work", Case(_valid(output_dir="~/runs/x", data={"path": "missing.jsonl"})))
    before = _snapshot(workspace, home / "runs")
    result = CliRunner().invoke(app, ["train", str(config), "--fresh", "--quiet"])
    assert "moved the previous run to" in result.stderr and (home / "runs" / "x.old-1" / METRICS).is_file()
    assert not (workspace / "work" / "~").exists()
    assert result.exit_code == 2 and "missing.jsonl" in result.stderr  # then training stops on the missing data
    assert _snapshot(workspace, home / "runs") == before
    assert sorted(p.name for p in (home / "runs").iterdir()) in (["x.old-1"], ["x", "x.old-1"])
    # a new run, nothing in it but its mark and its lock
    assert not run.exists() or not any(p.name not in (RUN_MARK, LOCK) for p in run.iterdir())


# --- the same through real processes: what a terminal shows -------------------------------------------------

def _cli(args: list[str], cwd: Path, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src"), "HOME": str(cwd.parent / "home"),
           "XDG_CACHE_HOME": str(default_cache_dir().parent)}
    return subprocess.Popen([sys.executable, "-m", "snugtune", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


@pytest.mark.parametrize("name", ["billion laughs", "a huge value", "lr = inf", "seed past 64 bits", "not UTF-8"])
def test_a_real_terminal_gets_one_short_line(workspace, name):
    case = CONFIGS[name]
    work = workspace / "work"
    config = _write_config(work, case)
    before = _snapshot(workspace, None)
    proc = _cli(["train", str(config)], work)
    _, stderr = proc.communicate(timeout=120)
    _check_the_user_sees_one_line(proc.returncode, stderr, case)
    assert len(stderr) < LONGEST_LINE + 100 and _snapshot(workspace, None) == before


@pytest.mark.parametrize("delay", [0.0, 1.5])
def test_ctrl_c_while_loading_the_model_and_data_is_exit_130_without_a_traceback(workspace, delay):
    work = workspace / "work"
    # a long run: a Ctrl-C that comes late stops training (exit 130) instead of landing after its last step
    proc = _cli(["train", str(_write_config(work, Case())), "train.max_steps=1000", "--quiet"], work)
    assert proc.stdout.readline().startswith("snugtune: training")  # the command runs: config read, torch loaded
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr[-2000:]
    assert "checkpoint saved" in stderr or not complete_checkpoints(work / "runs" / "x")


HOLDER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from snugtune.rundir import hold_run_lock
    with hold_run_lock(Path(sys.argv[1])):
        print("held", flush=True)
        sys.stdin.read()
""")


def test_fresh_on_a_run_another_process_is_training_is_refused_naming_it(workspace):
    work = workspace / "work"
    run = _old_run(work / "runs" / "x")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src")}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        case = Case(args=FRESH, says=f"in use by another snugtune process (pid {holder.pid})")
        _try(workspace, case)
    finally:
        holder.kill()
        holder.wait()
    with hold_run_lock(run):  # released with the holder
        pass


# --- a full disk and signals while training (real training runs: slow) ----------------------------------

FULL_DISK = textwrap.dedent("""
    import resource, signal, sys
    import snugtune.engine.train as train_module
    from snugtune.cli import main
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing
    real_save, saves = train_module.save_checkpoint, []
    def save_on_a_filling_disk(run_dir, *args, **kwargs):
        saves.append(1)
        if len(saves) == 2:  # the second checkpoint's weights still fit, torch's state.pt no longer does
            first = max((run_dir / "checkpoints").glob("step-*"))
            room = (first / "trainable.safetensors").stat().st_size + 4096
            resource.setrlimit(resource.RLIMIT_FSIZE, (room, resource.RLIM_INFINITY))
        return real_save(run_dir, *args, **kwargs)
    train_module.save_checkpoint = save_on_a_filling_disk
    sys.argv = ["snugtune", *sys.argv[1:]]
    main()
""")


@pytest.mark.slow
def test_a_disk_that_fills_during_a_checkpoint_is_one_line_and_the_previous_checkpoint_stays(workspace):
    work = workspace / "work"
    config = _write_config(work, Case(_valid(train={"max_steps": 6, "micro_batch": 2},
                                             save={"every_steps": 2, "keep": 3})))
    before = _snapshot(workspace, work / "runs")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src"), "XDG_CACHE_HOME": str(default_cache_dir().parent)}
    proc = subprocess.run([sys.executable, "-c", FULL_DISK, "train", str(config), "--quiet"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=600)
    case = Case(says="could not write checkpoint")
    _check_the_user_sees_one_line(proc.returncode, proc.stderr, case)
    assert "File too large; the previous checkpoint step-2 is intact" in proc.stderr
    kept = complete_checkpoints(work / "runs" / "x")
    assert [p.name for p in kept] == ["step-2"] and not list((work / "runs" / "x" / "checkpoints").glob(".tmp-*"))
    assert json.loads((kept[0] / "position.json").read_text())["step"] == 2
    assert _snapshot(workspace, work / "runs") == before


@pytest.mark.slow
def test_sigterm_while_training_saves_and_exits_130(workspace):
    work = workspace / "work"
    config = _write_config(work, Case(_valid(train={"max_steps": 5000, "micro_batch": 2})))
    proc = _cli(["train", str(config), "--quiet"], work)
    metrics, deadline = work / "runs" / "x" / METRICS, time.time() + 300
    while time.time() < deadline and (not metrics.exists() or metrics.read_text().count('"loss"') < 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130 and "Traceback" not in stderr and "checkpoint saved" in stderr, stderr[-2000:]
    assert len(complete_checkpoints(work / "runs" / "x")) == 1
