"""The Python entry point: `snugtune.train(config)` does what `snugtune train CONFIG` does, minus the CLI."""

from __future__ import annotations


def train(config, overrides: list[str] | None = None, show_progress: bool = True) -> dict:
    """Fine-tune from a Config, a YAML path or a dict; returns the run's summary (summary.json)."""
    from snugtune.config import Config, apply_overrides, config_from_dict, load_config
    from snugtune.engine.train import train as run_training
    from snugtune.trackers import check_installed

    if isinstance(config, dict):
        config = config_from_dict(apply_overrides(dict(config), overrides or []))
    elif not isinstance(config, Config):
        config = load_config(config, overrides)
    check_installed(config)  # a missing extra stops before anything is built or written
    return run_training(config, show_progress=show_progress)
