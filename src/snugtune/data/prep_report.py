"""What happened to the rows on their way to samples: printed by `train` and `data`, kept in summary.json."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DataReport:
    format: str = ""
    format_reason: str = ""
    chat_template: str = ""
    source_notes: list[str] = field(default_factory=list)  # how the data was found and read
    unused_columns: list[str] = field(default_factory=list)
    turn_fields: dict[str, str] = field(default_factory=dict)  # each per-turn field and what was done with it
    rows_read: int = 0
    kept: int = 0
    truncated: int = 0
    documents_split: int = 0  # text documents longer than max_seq_len ...
    chunks: int = 0  # ... and the chunks they became
    dropped: dict[str, int] = field(default_factory=dict)
    blank_answers: int = 0  # blank answers removed from conversations that were kept
    merged_turns: int = 0  # turns merged into the one before (same role, for a template that needs alternation)
    train_samples: int = 0
    eval_samples: int = 0
    train_tokens: int = 0
    cache: str = "off"  # hit | miss | off

    def drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + n


def report_lines(report: DataReport) -> list[str]:
    """The report as lines a person reads: how the data was read, the format and why, the template, every
    field not used or used in a way of its own, and every count of rows dropped, truncated or split."""
    dropped = sum(report.dropped.values())
    reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(report.dropped.items()))
    lines = [f"read: {note}" for note in report.source_notes]
    lines += [f"data format: {report.format} ({report.format_reason}); chat template: {report.chat_template}; "
              f"tokenized cache: {report.cache}",
              f"rows read {report.rows_read}, kept {report.kept}, dropped {dropped}" + (f" ({reasons})" if reasons else "")
              + f", truncated {report.truncated} to max_seq_len",
              f"samples: train {report.train_samples}, eval {report.eval_samples}; {report.train_tokens:,} training tokens"]
    if report.unused_columns:
        lines.append(f"columns not used by the {report.format} format: {', '.join(report.unused_columns)} "
                     f"(map one to a field with data.columns if it holds what the field should)")
    lines += [f"turn field '{key}': {use}" for key, use in report.turn_fields.items()
              if key not in ("role", "from", "content", "value")]
    if report.blank_answers:
        lines.append(f"removed {report.blank_answers} blank answers, each with the user turns it answered, from "
                     f"conversations otherwise kept")
    if report.merged_turns:
        lines.append(f"merged {report.merged_turns} turns into the turn before them, of the same role (the chat "
                     f"template needs alternating roles)")
    if report.documents_split:
        lines.append(f"split {report.documents_split} documents longer than max_seq_len into {report.chunks} chunks "
                     f"(packed; no token dropped)")
    return lines
