"""The results table (Markdown) and loss curves (PNG) across run directories — the seeds' table."""

from __future__ import annotations

import statistics
from pathlib import Path

from snugtune.config import Config, config_from_dict
from snugtune.errors import UserError
from snugtune.output_folder import check_target, discard, publish, staging_folder
from snugtune.rundir import CONFIG, RunFolder

COLUMNS = ["run", "model", "dataset", "samples", "method", "LoRA", "peak memory", "train time", "tokens/s",
           "train loss", "eval loss (base → tuned)", "retention", "HumanEval pass@1 (base → tuned)",
           "preference accuracy (base → tuned)", "reward margin"]
PREFERENCE_CURVES = ("rewards/margins", "rewards/accuracies")  # plotted per step where a run logs them


def _run_files(run_dir: Path) -> tuple[dict, Config, dict, list[dict]]:
    """summary.json, config.yaml, eval.json ({} if none) and the step rows of metrics.jsonl, each checked."""
    run = RunFolder(run_dir)
    summary = run.summary()
    config = config_from_dict(run.config_dict(), source=str(run_dir / CONFIG))
    return summary, config, run.evals(), [m for m in run.metrics() if "tokens_per_s" in m]


def preference_cells(summary: dict, evals: dict) -> dict:
    """The preference columns: `eval --task preference`'s accuracy on held-out pairs (base vs tuned), else the
    training's held-out rewards/accuracies (the base as reference: 0% before training); the held-out reward
    margin after training (rewards/margins)."""
    pref, after = evals.get("preference"), summary.get("eval_metrics_after") or {}
    before = summary.get("eval_metrics_before") or {}
    if pref and "pairs" in pref:
        accuracy = f"{pref['base_accuracy']:.1%} → {pref['tuned_accuracy']:.1%} ({pref['pairs']} pairs)"
    elif "rewards/accuracies" in after:
        accuracy = f"{before.get('rewards/accuracies', 0.0):.1%} → {after['rewards/accuracies']:.1%} (rewards)"
    else:
        accuracy = "-"
    margin = f"{after['rewards/margins']:.4f}" if "rewards/margins" in after else "-"
    return {"preference accuracy (base → tuned)": accuracy, "reward margin": margin}


def report_row(run_dir: Path) -> dict:
    """One table row (column -> text) from a run's summary.json, config.yaml, metrics.jsonl and eval.json."""
    summary, config, evals, steps = _run_files(run_dir)
    lora = config.lora
    targets = lora.targets if isinstance(lora.targets, str) else ",".join(lora.targets)
    ppl, ret, he = evals.get("perplexity"), evals.get("retention"), evals.get("humaneval")
    try:
        return {
            "run": run_dir.name, "model": summary["model"], "dataset": Path(config.data.path).name,
            "samples": str(summary["data"]["train_samples"]),
            "method": summary["method"] + (f", {config.objective}" if config.objective != "sft" else ""),
            "LoRA": f"r={lora.r} α={lora.alpha:g} drop={lora.dropout:g} {targets}" if config.uses_lora else "-",
            "peak memory": f"{summary['peak_memory_bytes'] / 2**30:.2f} GiB"
                           + (" (CPU RSS)" if "RSS" in summary.get("peak_memory_kind", "") else ""),
            "train time": train_time(summary),
            "tokens/s": f"{statistics.median(m['tokens_per_s'] for m in steps):,.0f}" if steps else "-",
            "train loss": f"{summary['train_loss_final']:.4f}" if summary.get("train_loss_final") is not None else "-",
            "eval loss (base → tuned)": (f"{ppl['base_loss']:.4f} → {ppl['tuned_loss']:.4f}" if ppl else
                                         f"{summary['eval_loss_before']:.4f} → {summary['eval_loss_after']:.4f}"),
            "retention": f"{ret['kept_percent']:.1f}%" if ret else "-",
            "HumanEval pass@1 (base → tuned)": (f"{he['base_pass@1']:.1%} → {he['tuned_pass@1']:.1%} "
                                                 f"({he['problems']} problems)" if he else "-"),
            **preference_cells(summary, evals),
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{run_dir}: summary.json or eval.json lacks or garbles {exc}; rerun `snugtune train` "
                        f"(summary) or move eval.json aside and rerun `snugtune eval`") from None


def train_time(summary: dict) -> str:
    """Minutes of training over every invocation of the run (older summaries: the last invocation's)."""
    seconds = summary.get("run_wall_seconds", summary["wall_seconds"])
    return f"{seconds / 60:.1f} min"


def build_report(run_dirs: list[Path], out_dir: Path) -> tuple[Path, Path]:
    """Write out_dir/report.md and out_dir/loss_curves.png; returns their paths. out_dir must be new, empty or
    an earlier report's output, and outside every run folder (see output_folder)."""
    run_dirs = [Path(d) for d in run_dirs]
    rows = [report_row(d) for d in run_dirs]
    check_target(out_dir, "report", run_dirs)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row[c] for c in COLUMNS) + " |" for row in rows]
    markdown = "# snugtune results\n\n" + "\n".join(lines) + "\n\n![loss curves](loss_curves.png)\n"
    preference = any(any(name in m for name in PREFERENCE_CURVES) for d in run_dirs for m in RunFolder(d).metrics())
    if preference:
        markdown += "\n![preference curves](preference_curves.png)\n"
    staging = staging_folder(out_dir)
    try:
        (staging / "report.md").write_text(markdown, encoding="utf-8")
        _plot(run_dirs, staging / "loss_curves.png")
        if preference:
            _plot_preference(run_dirs, staging / "preference_curves.png")
        publish(staging, out_dir, "report")
    except BaseException:
        discard(staging)
        raise
    return out_dir / "report.md", out_dir / "loss_curves.png"


def _plot_preference(run_dirs: list[Path], target: Path) -> Path:
    """The reward margin and accuracy per optimizer step (training, and held-out where logged) of each run
    that logs them: the margin rises as the model prefers the chosen answers more than the reference does."""
    plt, fig, axes = _figure(len(PREFERENCE_CURVES))
    for ax, name in zip(axes, PREFERENCE_CURVES):
        _curves(ax, run_dirs, name, name)
    return _save(plt, fig, target)


def _plot(run_dirs: list[Path], target: Path) -> Path:
    plt, fig, (ax,) = _figure(1)
    _curves(ax, run_dirs, "loss", "loss (nats/token)")
    return _save(plt, fig, target)


def _figure(panels: int):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, panels, figsize=(8 if panels == 1 else 11, 4.5), dpi=110, squeeze=False)
    return plt, fig, axes[0]


def _curves(ax, run_dirs: list[Path], name: str, label: str) -> None:
    """Each run's `name` per optimizer step (training) and its eval_ twin (held-out, dashed, same colour)."""
    for run_dir in map(Path, run_dirs):
        metrics = RunFolder(run_dir).metrics()
        train = [(m["step"], m[name]) for m in metrics if name in m]
        evals = [(m["step"], m[f"eval_{name}"]) for m in metrics if f"eval_{name}" in m]
        line = ax.plot(*zip(*train), lw=1.3, label=f"{run_dir.name} train")[0] if train else None
        if evals:
            ax.plot(*zip(*evals), "o--", color=line.get_color() if line else None, label=f"{run_dir.name} held-out")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _save(plt, fig, target: Path) -> Path:
    fig.tight_layout()
    fig.savefig(target)
    plt.close(fig)
    return target
