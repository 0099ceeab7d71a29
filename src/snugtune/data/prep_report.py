"""What happened to the rows on their way to samples: printed by `train` and `data`, kept in summary.json."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DataReport:
    format: str = ""
    format_reason: str = ""
    chat_template: str = ""
    unused_columns: list[str] = field(default_factory=list)
    rows_read: int = 0
    kept: int = 0
    truncated: int = 0
    documents_split: int = 0  # text documents longer than max_seq_len ...
    chunks: int = 0  # ... and the chunks they became
    dropped: dict[str, int] = field(default_factory=dict)
    train_samples: int = 0
    eval_samples: int = 0
    train_tokens: int = 0
    cache: str = "off"  # hit | miss | off

    def drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + n


def report_lines(report: DataReport) -> list[str]:
    """The report as lines a person reads: the format and why, the template, and every count of rows
    dropped, truncated or split."""
    dropped = sum(report.dropped.values())
    reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(report.dropped.items()))
    lines = [f"data format: {report.format} ({report.format_reason}); chat template: {report.chat_template}; "
             f"tokenized cache: {report.cache}",
             f"rows read {report.rows_read}, kept {report.kept}, dropped {dropped}" + (f" ({reasons})" if reasons else "")
             + f", truncated {report.truncated} to max_seq_len",
             f"samples: train {report.train_samples}, eval {report.eval_samples}; {report.train_tokens:,} training tokens"]
    if report.unused_columns:
        lines.append(f"columns not used by the {report.format} format: {', '.join(report.unused_columns)} "
                     f"(map one to a field with data.columns if it holds what the field should)")
    if report.documents_split:
        lines.append(f"split {report.documents_split} documents longer than max_seq_len into {report.chunks} chunks "
                     f"(packed; no token dropped)")
    return lines
