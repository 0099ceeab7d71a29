"""The results table (Markdown) and loss curves (PNG) across run directories — the seeds' table."""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path


from snugtune.methods import METHODS
from snugtune.rundir import EVAL, RunFolder, write_text_atomic

COLUMNS = ["run", "model", "dataset", "samples", "method", "LoRA", "peak memory", "train time", "tokens/s",
           "train loss", "eval loss (base → tuned)", "retention", "HumanEval pass@1 (base → tuned)"]


def report_row(run_dir: Path) -> dict:
    """One table row (column -> text) from a run's summary.json, config.yaml, metrics.jsonl and eval.json."""
    run = RunFolder(run_dir)
    summary, config = run.summary(), run.config_dict()
    evals = json.loads((run_dir / EVAL).read_text()) if (run_dir / EVAL).is_file() else {}
    steps = [m for m in run.metrics() if "tokens_per_s" in m]
    lora = config["lora"]
    uses_lora = METHODS[config["method"]].adapters
    targets = lora["targets"] if isinstance(lora["targets"], str) else ",".join(lora["targets"])
    ppl, ret, he = evals.get("perplexity"), evals.get("retention"), evals.get("humaneval")
    return {
        "run": run_dir.name, "model": summary["model"], "dataset": Path(config["data"]["path"]).name,
        "samples": str(summary["data"]["train_samples"]), "method": summary["method"],
        "LoRA": f"r={lora['r']} α={lora['alpha']:g} drop={lora['dropout']:g} {targets}" if uses_lora else "-",
        "peak memory": f"{summary['peak_memory_bytes'] / 2**30:.2f} GiB"
                       + (" (CPU RSS)" if "RSS" in summary.get("peak_memory_kind", "") else ""),
        "train time": f"{summary['wall_seconds'] / 60:.1f} min",
        "tokens/s": f"{statistics.median(m['tokens_per_s'] for m in steps):,.0f}" if steps else "-",
        "train loss": f"{summary['train_loss_final']:.4f}" if summary.get("train_loss_final") is not None else "-",
        "eval loss (base → tuned)": (f"{ppl['base_loss']:.4f} → {ppl['tuned_loss']:.4f}" if ppl else
                                     f"{summary['eval_loss_before']:.4f} → {summary['eval_loss_after']:.4f}"),
        "retention": f"{ret['kept_percent']:.1f}%" if ret else "-",
        "HumanEval pass@1 (base → tuned)": (f"{he['base_pass@1']:.1%} → {he['tuned_pass@1']:.1%} "
                                             f"({he['problems']} problems)" if he else "-"),
    }


def build_report(run_dirs: list[Path], out_dir: Path) -> tuple[Path, Path]:
    """Write out_dir/report.md and out_dir/loss_curves.png; returns their paths."""
    rows = [report_row(Path(d)) for d in run_dirs]
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row[c] for c in COLUMNS) + " |" for row in rows]
    markdown = "# snugtune results\n\n" + "\n".join(lines) + "\n\n![loss curves](loss_curves.png)\n"
    report = out_dir / "report.md"
    write_text_atomic(report, markdown)
    return report, _plot(run_dirs, out_dir / "loss_curves.png")


def _plot(run_dirs: list[Path], target: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for run_dir in map(Path, run_dirs):
        metrics = RunFolder(run_dir).metrics()
        train = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
        evals = [(m["step"], m["eval_loss"]) for m in metrics if "eval_loss" in m]
        line = ax.plot(*zip(*train), lw=1.3, label=f"{run_dir.name} train")[0] if train else None
        if evals:
            ax.plot(*zip(*evals), "o--", color=line.get_color() if line else None, label=f"{run_dir.name} held-out")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = target.with_name(f".{target.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, target)
    return target
