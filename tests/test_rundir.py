"""rundir.py: the run folder read by name (a missing or broken file is one error naming it), recognised
before anything is moved, held by one writer, and its metrics log holding each step once."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import REPO_ROOT
from snugtune.config import config_to_yaml, config_from_dict
from snugtune.errors import UserError
from snugtune.rundir import (LOCK, METRICS, RUN_MARK, MetricsLog, RunFolder, complete_checkpoints, hold_run_lock,
                             is_run_folder, prepare_run_folder, read_jsonl, set_aside_run, write_text_atomic)


def test_a_finished_run_reads_back_what_training_wrote(tmp_path):
    run = RunFolder(tmp_path)
    run.write_config("model: shape:tiny\nmethod: lora\n")
    run.write_summary({"base_model_path": "/models/base", "steps": 3})
    log = MetricsLog(tmp_path, [])
    log.write({"step": 1, "loss": 2.5})
    log.close()
    assert run.config_dict() == {"model": "shape:tiny", "method": "lora"}
    assert run.summary()["steps"] == 3 and str(run.base_model_path()) == "/models/base"
    assert run.metrics() == [{"step": 1, "loss": 2.5}]
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writes leave no temp files


@pytest.mark.parametrize("damage, message", [
    (lambda d: None, "summary.json: missing (training has not finished"),
    (lambda d: (d / "summary.json").write_text("{not json"), "summary.json: cannot be read"),
    (lambda d: (d / "summary.json").write_text("[1, 2]"), "summary.json: expected a mapping"),
    (lambda d: (d / "summary.json").write_text(json.dumps({"steps": 3})), "summary.json: no base_model_path"),
])
def test_a_damaged_summary_is_one_error_naming_the_file(tmp_path, damage, message):
    damage(tmp_path)
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        RunFolder(tmp_path).base_model_path()


def test_a_malformed_config_names_the_file(tmp_path):
    (tmp_path / "config.yaml").write_text("model: [unclosed\n")
    with pytest.raises(UserError, match=r"config.yaml:\d+: not valid YAML .*; restore it"):
        RunFolder(tmp_path).config_dict()
    (tmp_path / "config.yaml").write_text("a: &a [*a]\n")
    with pytest.raises(UserError, match="config.yaml: a YAML alias refers to itself"):
        RunFolder(tmp_path).config_dict()


def test_only_complete_checkpoints_count_in_step_order(tmp_path):
    for name, complete in (("step-10", True), ("step-2", True), ("step-30", False), (".step-40.tmp", True)):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
        if complete:
            (tmp_path / "checkpoints" / name / "COMPLETE").write_text("")
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-2", "step-10"]
    assert RunFolder(tmp_path).checkpoints() == complete_checkpoints(tmp_path)


# --- what is a run, and --fresh moving only runs ----------------------------------------------------------

def _old_run(folder):
    """A run folder as training wrote it before the run mark existed: config.yaml beside metrics.jsonl."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(config_to_yaml(config_from_dict({"data": {"path": "x"}})))
    (folder / METRICS).write_text('{"step": 1, "loss": 2.0}\n')
    return folder


def _listing(folder) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*")}


RUN_OR_NOT = {  # folder contents -> is it a run
    "marked": ({RUN_MARK: "{}"}, True),
    "old run: config.yaml and metrics": ({"config.yaml": None, METRICS: "{}"}, True),
    "old run: config.yaml and summary": ({"config.yaml": None, "summary.json": "{}"}, True),
    "config.yaml alone": ({"config.yaml": None}, False),
    "a user's config.yaml beside metrics": ({"config.yaml": "lr: 3\n", METRICS: "{}"}, False),
    "a YAML bomb as config.yaml": ({"config.yaml": "a: &a [*a]\n", METRICS: "{}"}, False),
    "metrics alone": ({METRICS: "{}"}, False),
    "a project folder": ({"README.md": "mine", "src.py": "print(1)"}, False),
    "a lock file alone": ({LOCK: "123"}, False),
}


@pytest.mark.parametrize("case", list(RUN_OR_NOT))
def test_a_run_is_recognised_by_its_mark_or_its_files_and_nothing_else(tmp_path, case):
    files, is_run = RUN_OR_NOT[case]
    for name, text in files.items():
        (tmp_path / name).write_text(text if text is not None else
                                     config_to_yaml(config_from_dict({"data": {"path": "x"}})))
    assert is_run_folder(tmp_path) == is_run


@pytest.mark.parametrize("case", list(RUN_OR_NOT))
def test_fresh_sets_aside_only_a_run_and_refuses_any_other_folder(tmp_path, case):
    folder = tmp_path / "out"
    folder.mkdir()
    files, is_run = RUN_OR_NOT[case]
    for name, text in files.items():
        (folder / name).write_text(text if text is not None else
                                   config_to_yaml(config_from_dict({"data": {"path": "x"}})))
    before = _listing(tmp_path)
    if not is_run:
        with pytest.raises(UserError, match="not a snugtune run; --fresh sets aside only a run folder"):
            set_aside_run(folder)
        assert _listing(tmp_path) == before  # nothing moved, renamed, created or deleted
        return
    aside = set_aside_run(folder)
    assert aside == tmp_path / "out.old-1" and not folder.exists()
    assert {name for name in files} <= {p.name for p in aside.iterdir()}


def test_setting_aside_keeps_every_file_and_never_takes_a_used_name(tmp_path):
    run = _old_run(tmp_path / "run")
    (tmp_path / "run.old-1").mkdir()
    os.symlink(tmp_path / "nowhere", tmp_path / "run.old-2")  # a dangling link is a name in use too
    aside = set_aside_run(run)
    assert aside == tmp_path / "run.old-3" and (aside / METRICS).is_file() and not run.exists()
    assert set_aside_run(run) is None  # nothing there any more
    (tmp_path / "empty").mkdir()
    assert set_aside_run(tmp_path / "empty") is None and (tmp_path / "empty").is_dir()


def test_fresh_refuses_a_file_a_link_and_the_current_folder(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("mine")
    run = _old_run(tmp_path / "run")
    os.symlink(run, tmp_path / "link")
    for target, message in ((tmp_path / "file", "not a plain folder"), (tmp_path / "link", "not a plain folder")):
        with pytest.raises(UserError, match=message):
            set_aside_run(target)
    for cwd in (run, run / "notes"):
        cwd.mkdir(exist_ok=True)
        monkeypatch.chdir(cwd)
        with pytest.raises(UserError, match="the current folder or holds it"):
            set_aside_run(run)
    assert (tmp_path / "file").read_text() == "mine" and run.is_dir() and (tmp_path / "link").is_symlink()


@pytest.mark.parametrize("case", ["new", "empty", "marked run", "old run", "user folder", "file", "link"])
def test_preparing_a_run_folder_marks_it_and_refuses_what_is_not_a_run(tmp_path, case):
    folder = tmp_path / "out"
    if case == "empty":
        folder.mkdir()
    elif case == "marked run":
        folder.mkdir()
        (folder / RUN_MARK).write_text("{}")
    elif case == "old run":
        _old_run(folder)
    elif case == "user folder":
        folder.mkdir()
        (folder / "thesis.tex").write_text("mine")
    elif case == "file":
        folder.write_text("mine")
    elif case == "link":
        os.symlink(_old_run(tmp_path / "real"), folder)
    before = _listing(tmp_path)
    if case in ("user folder", "file", "link"):
        with pytest.raises(UserError, match="not a snugtune run|not a plain folder"):
            prepare_run_folder(folder)
        assert _listing(tmp_path) == before
        return
    prepare_run_folder(folder)
    assert is_run_folder(folder) and (folder / RUN_MARK).is_file()
    assert sorted(p.name for p in folder.iterdir() if p.name not in (RUN_MARK, "config.yaml", METRICS)) == []


def test_preparing_an_unwritable_folder_is_one_error(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    locked = tmp_path / "ro"
    locked.mkdir(mode=0o500)
    with pytest.raises(UserError, match="cannot write to"):
        prepare_run_folder(locked / "run")


# --- one writer: the lock ----------------------------------------------------------------------------------

HOLDER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from snugtune.rundir import hold_run_lock
    with hold_run_lock(Path(sys.argv[1])):
        print("held", flush=True)
        sys.stdin.read()  # until the test closes stdin (or kills this process)
""")


def start_holder(folder) -> subprocess.Popen:
    """Another process holding folder's run lock (as a training process does) until stdin closes or it dies."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src")}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_process_is_refused_at_once_naming_the_holder_and_a_crash_releases_the_lock(tmp_path):
    prepare_run_folder(tmp_path)
    holder = start_holder(tmp_path)
    try:
        with pytest.raises(UserError, match=rf"in use by another snugtune process \(pid {holder.pid}\)"):
            with hold_run_lock(tmp_path):
                pass
        run = _old_run(tmp_path / "held-run")
        os.rename(tmp_path / LOCK, run / LOCK)  # the holder's lock file, now in a run --fresh is asked to move
        with pytest.raises(UserError, match=rf"pid {holder.pid}"):
            set_aside_run(run)
        assert run.is_dir() and not (tmp_path / "held-run.old-1").exists()
    finally:
        holder.kill()  # a crash: no cleanup runs in the holder
        holder.wait()
    with hold_run_lock(run):  # the kernel released it with the process
        assert (run / LOCK).read_text().strip() == str(os.getpid())
    assert (run / LOCK).read_text() == ""  # released: no pid left to name


def test_a_lock_file_that_is_a_link_is_refused_not_followed(tmp_path):
    victim = tmp_path / "precious.txt"
    victim.write_text("mine")
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(victim, run / LOCK)
    with pytest.raises(UserError, match="cannot open"):
        with hold_run_lock(run):
            pass
    assert victim.read_text() == "mine"


# --- metrics.jsonl holds each step once ---------------------------------------------------------------------

def test_a_step_logged_again_fills_in_its_line_and_restored_rows_replace_the_rest(tmp_path):
    log = MetricsLog(tmp_path, [])
    log.write({"step": 0, "eval_loss": 3.0})
    log.write({"step": 1, "loss": 2.5, "epoch": 0.5})
    log.write({"step": 2, "loss": 2.0, "epoch": 0.75})
    log.write({"step": 2, "epoch": 0.0, "eval_loss": 1.9})  # the held-out loss after the last step
    assert read_jsonl(tmp_path / METRICS) == [{"step": 0, "eval_loss": 3.0}, {"step": 1, "loss": 2.5, "epoch": 0.5},
                                               {"step": 2, "loss": 2.0, "epoch": 0.75, "eval_loss": 1.9}]
    with open(tmp_path / METRICS, "a") as handle:
        handle.write('{"step": 3, "lo')  # a process killed in the middle of a line
    MetricsLog(tmp_path, [{"step": 0, "eval_loss": 3.0}, {"step": 1, "loss": 2.5}, {"step": 1, "loss": 9.9}])
    assert read_jsonl(tmp_path / METRICS) == [{"step": 0, "eval_loss": 3.0}, {"step": 1, "loss": 2.5}]


def test_rows_without_a_step_are_one_error(tmp_path):
    with pytest.raises(UserError, match="without a whole-number step"):
        MetricsLog(tmp_path, [{"loss": 1.0}])
    (tmp_path / METRICS).write_text('{"step": 1}\n[1, 2]\n')
    with pytest.raises(UserError, match=r"metrics.jsonl:2: not a JSON line"):
        read_jsonl(tmp_path / METRICS)


class Trainer:
    """What training does with its metrics log, step by step: a row per logged step, a checkpoint (the rows so
    far) every `every` steps, the held-out loss at step 0 and after the last step; a resume reopens the log with
    the newest checkpoint's rows and trains on from its step."""

    def __init__(self, run_dir, steps: int, every: int, log_every: int):
        self.run_dir, self.steps, self.every, self.log_every = run_dir, steps, every, log_every
        self.checkpoints: list[tuple[int, list[dict]]] = []

    def row(self, step: int) -> dict:
        return {"step": step, "epoch": step / 4, "loss": 1.0 / step}

    def invocation(self, stop_at: int | None, how: str) -> None:
        """Run from the newest checkpoint; at step stop_at: 'kill' (nothing more happens), 'kill mid-line'
        (half a line appended), 'signal' (a checkpoint, then exit)."""
        step, rows = self.checkpoints[-1] if self.checkpoints else (0, [])
        log = MetricsLog(self.run_dir, rows)
        if not any(r["step"] == 0 for r in log.rows):
            log.write({"step": 0, "epoch": 0.0, "eval_loss": 5.0})
        while step < self.steps:
            step += 1
            if step % self.log_every == 0 or step == self.steps:
                log.write(self.row(step))
            if step % self.every == 0 or step == self.steps:
                self.checkpoints.append((step, [dict(r) for r in log.rows]))
            if step == stop_at:
                if how == "kill mid-line":
                    with open(self.run_dir / METRICS, "a") as handle:
                        handle.write('{"step": 99')
                elif how == "signal":
                    self.checkpoints.append((step, [dict(r) for r in log.rows]))
                return
        log.write({"step": step, "epoch": 0.0, "eval_loss": 0.5})


@settings(max_examples=60, deadline=None)
@given(steps=st.integers(1, 12), every=st.integers(1, 5), log_every=st.integers(1, 3),
       stops=st.lists(st.tuples(st.integers(1, 12), st.sampled_from(["kill", "kill mid-line", "signal"])),
                      max_size=5))
def test_metrics_hold_each_step_once_whatever_interruptions_and_resumes_came(tmp_path_factory, steps, every,
                                                                             log_every, stops):
    straight_dir, broken_dir = tmp_path_factory.mktemp("straight"), tmp_path_factory.mktemp("broken")
    Trainer(straight_dir, steps, every, log_every).invocation(None, "")
    broken = Trainer(broken_dir, steps, every, log_every)
    for stop_at, how in stops:
        broken.invocation(stop_at, how)
    broken.invocation(None, "")  # the last resume runs to the end
    rows = read_jsonl(broken_dir / METRICS)
    assert [r["step"] for r in rows] == sorted({r["step"] for r in rows})  # each step once, in order
    assert rows == read_jsonl(straight_dir / METRICS)


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temp_file(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    target.write_text("old")

    real_write = type(target).write_text

    def disk_full(path, text, *args, **kwargs):
        real_write(path, text[:1], *args, **kwargs)  # the first bytes land, then the disk is full
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(type(target), "write_text", disk_full)
    with pytest.raises(OSError):
        write_text_atomic(target, "new")
    monkeypatch.undo()
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["summary.json"]
