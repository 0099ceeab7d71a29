"""The data path: files -> normalized samples -> tokenized samples -> train/eval splits -> batches."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from snugtune.config import DataConfig
from snugtune.errors import ConfigError
from snugtune.data import cache
from snugtune.data.batches import (GPU_PAD_MULTIPLE, collate, collate_micro_batch, epoch_rows, eval_batches, micro_batches,
                                   real_tokens, trained_tokens_per_row)
from snugtune.data.formats import FormatChoice, Row, Skipped, detect_format, read_rows, to_sample
from snugtune.data.tokenize import TokenizedSample, fit_length, tokenize_sample

__all__ = ["GPU_PAD_MULTIPLE", "DataReport", "PreparedData", "prepare_data", "collate", "collate_micro_batch", "epoch_rows", "eval_batches",
           "micro_batches", "real_tokens", "trained_tokens_per_row"]


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
    cache: str = "off"  # hit | miss | off

    def drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + n


@dataclass
class PreparedData:
    train: list[TokenizedSample]
    eval: list[TokenizedSample]
    report: DataReport


def prepare_data(data: DataConfig, tokenizer, max_seq_len: int, seed: int, cache_dir: Path | None = None) -> PreparedData:
    """Read, normalize, tokenize, length-fit and split the data. ConfigError on bad input.

    With cache_dir, the result is stored under a key of (data content, tokenizer, template, max_seq_len,
    data settings) and reused by the next run with the same key.
    """
    if not Path(data.path).exists():
        raise ConfigError(f"data.path: {data.path} does not exist")
    key = None
    if cache_dir is not None:
        key = cache.cache_key(data, tokenizer, max_seq_len, seed)
        hit = cache.load_cached(cache_dir, key)
        if hit is not None:
            train, eval_, report = hit
            return PreparedData(train, eval_, DataReport(**{**report, "cache": "hit"}))
    prepared = _prepare(data, tokenizer, max_seq_len, seed)
    if key is not None:
        prepared.report.cache = "miss"
        cache.store(cache_dir, key, prepared.train, prepared.eval, asdict(prepared.report))
    return prepared


def _prepare(data: DataConfig, tokenizer, max_seq_len: int, seed: int) -> PreparedData:
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
