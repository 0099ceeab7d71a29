"""Sending metrics.jsonl's rows to Weights & Biases and MLflow too (optional extras, configured under `log`).

Nothing leaves the machine unless the config says so: W&B runs offline by default (written under
RUN_DIR/wandb, uploaded only by `wandb sync`), and MLflow writes to a local database in the run directory
unless `log.mlflow.tracking_uri` names a server. Each tracker gets the numeric fields of every row at the
row's step, the same numbers metrics.jsonl holds.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from snugtune.config import Config, MlflowConfig, WandbConfig
from snugtune.extras import require

MLFLOW_BATCH = 100  # MLflow refuses batches of more than 100 params or 1000 metrics


def numbers(row: dict) -> dict[str, float]:
    """The fields of a metrics row a tracker plots: numeric ones, less the step itself."""
    return {key: float(value) for key, value in row.items()
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}


def flat_params(value: dict, prefix: str = "") -> dict[str, str]:
    """A nested config as MLflow parameters: dotted names, values as text."""
    flat = {}
    for key, item in value.items():
        if isinstance(item, dict):
            flat.update(flat_params(item, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(item)
    return flat


def check_installed(config: Config) -> None:
    """ConfigError (exit 2) with the install command when a configured tracker's extra is missing: the train
    command calls it right after loading the config, before anything is built or written."""
    if config.log.wandb is not None:
        require("wandb", "log.wandb")
    if config.log.mlflow is not None:
        require("mlflow", "log.mlflow")


class WandbRun:
    """One W&B run for a training run."""

    def __init__(self, settings: WandbConfig, run_dir: Path, config: dict):
        import wandb  # open_trackers checked it imports

        if settings.mode == "offline":  # W&B's service reports its own errors online unless told not to
            os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
        # console="off": W&B would otherwise wrap stdout/stderr, under the progress bar
        self.run = wandb.init(mode=settings.mode, dir=str(run_dir), project=settings.project,
                              entity=settings.entity, name=settings.name or run_dir.name, config=config,
                              settings=wandb.Settings(console="off", silent=True))

    def log(self, row: dict) -> None:
        values = numbers(row)
        if values:
            self.run.log(values, step=row["step"])

    def close(self) -> None:
        self.run.finish()


class MlflowRun:
    """One MLflow run for a training run; the config goes in as its parameters."""

    def __init__(self, settings: MlflowConfig, run_dir: Path, config: dict):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = settings.tracking_uri or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(settings.experiment)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(settings.experiment)
        self.run_id = self.client.create_run(experiment_id, run_name=settings.run_name or run_dir.name).info.run_id
        params = [Param(key, value[:6000]) for key, value in flat_params(config).items()]
        for start in range(0, len(params), MLFLOW_BATCH):
            self.client.log_batch(self.run_id, params=params[start:start + MLFLOW_BATCH])

    def log(self, row: dict) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        metrics = [Metric(key, value, stamp, row["step"]) for key, value in numbers(row).items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class Trackers:
    """The trackers a config turns on; log() hands each the same row metrics.jsonl gets."""

    def __init__(self, runs: list):
        self.runs = runs

    def log(self, row: dict) -> None:
        for run in self.runs:
            run.log(row)

    def close(self) -> None:
        for run in self.runs:
            run.close()


def open_trackers(config: Config, run_dir: Path, kept_rows: list[dict]) -> Trackers:
    """Start the configured trackers and give them the rows a resumed run kept, so each holds what
    metrics.jsonl holds. No tracker configured: an empty Trackers, and nothing is imported."""
    check_installed(config)
    settings = config.model_dump(mode="json")
    runs = []
    if config.log.wandb is not None:
        runs.append(WandbRun(config.log.wandb, run_dir, settings))
    if config.log.mlflow is not None:
        runs.append(MlflowRun(config.log.mlflow, run_dir, settings))
    trackers = Trackers(runs)
    for row in kept_rows:
        trackers.log(row)
    return trackers
