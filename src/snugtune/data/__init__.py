"""The data path: files -> normalized samples -> tokenized samples -> train/eval splits -> batches."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from snugtune.config import ConfigError, DataConfig
from snugtune.data.formats import FormatChoice, Row, Skipped, detect_format, read_rows, to_sample
from snugtune.data.tokenize import IGNORE, TokenizedSample, fit_length, tokenize_sample


@dataclass
class DataReport:
    """What happened to the rows; printed by `snugtune data` and stored in summary.json."""
    format: str = ""
    format_reason: str = ""
    rows_read: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    train_samples: int = 0
    eval_samples: int = 0
    train_tokens: int = 0

    def drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + n


@dataclass
class PreparedData:
    train: list[TokenizedSample]
    eval: list[TokenizedSample]
    report: DataReport


def prepare_data(data: DataConfig, tokenizer, max_seq_len: int, seed: int) -> PreparedData:
    """Read, normalize, tokenize, length-fit and split the data. ConfigError on bad input."""
    skipped = Skipped()
    rows: list[Row] = list(read_rows(Path(data.path), skipped, data.skip_bad_rows))
    if not rows:
        raise ConfigError(f"{data.path}: no rows")
    choice = FormatChoice(data.format, "set in the config") if data.format != "auto" else detect_format(rows)
    report = DataReport(format=choice.name, format_reason=choice.reason, rows_read=len(rows) + sum(skipped.reasons.values()))
    for reason, n in skipped.reasons.items():
        report.drop(reason, n)

    random.Random(seed).shuffle(rows)
    if data.max_samples is not None:
        rows = rows[: data.max_samples]
    samples: list[TokenizedSample] = []
    for row in rows:
        try:
            sample = to_sample(row, choice.name)
            if _blank_answer(sample):
                report.drop("empty answer")
                continue
            tokenized = tokenize_sample(sample, tokenizer, row.where, data.train_on_prompt)
        except ConfigError:
            if not data.skip_bad_rows:
                raise
            report.drop("malformed row")
            continue
        fitted = fit_length(tokenized, max_seq_len, data.too_long)
        if fitted is None:
            report.drop(f"longer than max_seq_len={max_seq_len}")
            continue
        report.truncated += fitted is not tokenized
        samples.append(fitted)
    if not samples:
        raise ConfigError(f"{data.path}: no usable samples remain (dropped: {report.dropped})")
    report.kept = len(samples)
    n_eval = int(round(len(samples) * data.eval_fraction))
    if data.eval_fraction > 0 and len(samples) > 1:
        n_eval = max(1, n_eval)
    eval_samples, train_samples = samples[:n_eval], samples[n_eval:]
    if not train_samples:
        raise ConfigError(f"{data.path}: no training samples left after holding out eval_fraction={data.eval_fraction}")
    report.train_samples, report.eval_samples = len(train_samples), len(eval_samples)
    report.train_tokens = sum(len(s.input_ids) for s in train_samples)
    return PreparedData(train_samples, eval_samples, report)


def _blank_answer(sample: dict) -> bool:
    if "text" in sample:
        return not sample["text"].strip()
    answers = [m["content"] for m in sample["messages"] if m["role"] == "assistant"]
    return not answers or all(not a.strip() for a in answers)


def collate(samples: list[TokenizedSample], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest sample (right padding); padded positions are masked out of attention and loss."""
    longest = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), longest), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(samples), longest), dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s.input_ids)
        ids[i, :n] = torch.tensor(s.input_ids)
        labels[i, :n] = torch.tensor(s.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """A deterministic shuffle of range(n) for one epoch (resume replays the same order)."""
    order = list(range(n))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    return order


def micro_batches(samples: list[TokenizedSample], batch_size: int, seed: int, epoch: int) -> list[list[TokenizedSample]]:
    """One epoch of micro-batches in shuffled order (the last may be short)."""
    order = epoch_order(len(samples), seed, epoch)
    return [[samples[i] for i in order[k: k + batch_size]] for k in range(0, len(order), batch_size)]
