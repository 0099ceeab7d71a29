"""rundir.py: the run folder read by name; a missing or broken file is one error naming it."""

import json

import pytest

from snugtune.errors import UserError
from snugtune.rundir import MetricsLog, RunFolder, complete_checkpoints, move_run_aside


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
    with pytest.raises(UserError, match="config.yaml: cannot be read"):
        RunFolder(tmp_path).config_dict()


def test_only_complete_checkpoints_count_in_step_order(tmp_path):
    for name, complete in (("step-10", True), ("step-2", True), ("step-30", False), (".step-40.tmp", True)):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
        if complete:
            (tmp_path / "checkpoints" / name / "COMPLETE").write_text("")
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-2", "step-10"]
    assert RunFolder(tmp_path).checkpoints() == complete_checkpoints(tmp_path)


def test_moving_a_run_aside_keeps_every_file(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text("{}")
    (tmp_path / "run.old-1").mkdir()
    aside = move_run_aside(run)
    assert aside == tmp_path / "run.old-2" and (aside / "summary.json").is_file() and not run.exists()
