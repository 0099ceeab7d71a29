"""W&B and MLflow get the numbers metrics.jsonl gets, locally, with the real libraries (skipped without them)."""

import json
import struct
import sys
from pathlib import Path

import pytest

from conftest import tiny_config
from snugtune.errors import UserError
from snugtune.engine.train import train
from snugtune.trackers import open_trackers

W_AND_B_BLOCK = 32768  # W&B's run file: a LevelDB-style log of 32 KiB blocks holding protobuf Records


def wandb_history(run_dir: Path) -> list[dict]:
    """The history rows of the one offline W&B run under run_dir, read from its .wandb file."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending, history = 7, b"", []
    while pos + 7 <= len(data):
        if W_AND_B_BLOCK - pos % W_AND_B_BLOCK < 7:  # a block's tail too short for a header is padding
            pos += W_AND_B_BLOCK - pos % W_AND_B_BLOCK
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record.FromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                history.append({item.key or ".".join(item.nested_key): json.loads(item.value_json)
                                for item in record.history.item})
    return history


def expected_rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl's rows as a tracker sees them: numeric fields by step (rows at one step merged)."""
    merged: dict[int, dict] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        merged.setdefault(row["step"], {}).update(
            {k: v for k, v in row.items() if k != "step" and type(v) in (int, float)})
    return [{"_step": step, **values} for step, values in sorted(merged.items())]


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    from conftest import alpaca_rows, write_jsonl
    tmp = tmp_path_factory.mktemp("tracked")
    data = write_jsonl(tmp / "alpaca.jsonl", alpaca_rows(48))
    config = tiny_config(tmp, data, train={"max_steps": 4, "log_every": 1}, eval={"every_steps": 2},
                         log={"wandb": True, "mlflow": {"experiment": "tests", "run_name": "tiny"}})
    train(config, show_progress=False)
    return Path(config.output_dir)


@pytest.mark.slow
def test_wandb_offline_run_holds_the_metrics_rows(tracked_run):
    history = wandb_history(tracked_run)
    got = {}
    for row in history:
        got.setdefault(row["_step"], {}).update({k: v for k, v in row.items() if not k.startswith("_")})
    want = expected_rows(tracked_run)
    assert len(want) >= 5
    assert [{"_step": step, **values} for step, values in sorted(got.items())] == want


@pytest.mark.slow
def test_mlflow_local_store_holds_the_metrics_rows_and_the_config(tracked_run):
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{tracked_run / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert run.info.run_name == "tiny" and run.info.status == "FINISHED"
    assert run.data.params["lora.r"] == "4" and run.data.params["model"] == "shape:tiny"
    got: dict[int, dict] = {}
    for key in run.data.metrics:
        for metric in client.get_metric_history(run.info.run_id, key):
            got.setdefault(metric.step, {})[key] = metric.value
    assert [{"_step": step, **values} for step, values in sorted(got.items())] == expected_rows(tracked_run)


def test_no_tracker_configured_imports_and_writes_nothing(tmp_path, alpaca_file, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # an import would now fail
    monkeypatch.setitem(sys.modules, "mlflow", None)
    trackers = open_trackers(tiny_config(tmp_path, alpaca_file), tmp_path, [{"step": 1, "loss": 2.0}])
    trackers.log({"step": 2, "loss": 1.0})
    trackers.close()
    assert list(tmp_path.iterdir()) == [alpaca_file]


@pytest.mark.parametrize("tracker", ["wandb", "mlflow"])
def test_missing_extra_names_the_install_command(tmp_path, alpaca_file, monkeypatch, tracker):
    monkeypatch.setitem(sys.modules, tracker, None)
    config = tiny_config(tmp_path, alpaca_file, log={tracker: True})
    with pytest.raises(UserError, match=rf"log.{tracker} needs .*pip install 'snugtune\[{tracker}\]'"):
        open_trackers(config, tmp_path, [])
