"""The data path: rows -> normalized samples -> tokenized samples -> train/eval splits."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from pathlib import Path

from snugtune.config import DataConfig
from snugtune.errors import ConfigError
from snugtune.data import cache
from snugtune.data.columns import map_columns
from snugtune.data.detect import FormatChoice, detect_format, unused_columns
from snugtune.data.files import read_rows
from snugtune.data.normalize import blank_turn, to_sample
from snugtune.data.prep_report import DataReport
from snugtune.data.rows import Row, Skipped
from snugtune.data.templates import TemplateAbilities, check_renderable, set_chat_template, template_abilities
from snugtune.data.tokenize import TokenizedSample, fit_length, split_document, tokenize_sample


@dataclass
class PreparedData:
    train: list[TokenizedSample]
    eval: list[TokenizedSample]
    report: DataReport


def prepare_data(data: DataConfig, tokenizer, max_seq_len: int, seed: int, cache_dir: Path | None = None) -> PreparedData:
    """Read, normalize, tokenize, length-fit and split the data. ConfigError on bad input.

    Sets tokenizer.chat_template to the template the run trains with (and saves beside the adapter).
    With cache_dir, the result of local data is stored under a key of (data content, tokenizer, template,
    max_seq_len, data settings) and reused by the next run with the same key; hub datasets have their own.
    """
    template = set_chat_template(tokenizer, data)
    key = None
    if cache_dir is not None and Path(data.path).exists():
        key = cache.cache_key(data, tokenizer, max_seq_len, seed)
        hit = cache.load_cached(cache_dir, key)
        if hit is not None:
            train, eval_, report = hit
            return PreparedData(train, eval_, DataReport(**{**report, "cache": "hit"}))
    prepared = _prepare(data, tokenizer, max_seq_len, seed, template)
    if key is not None:
        prepared.report.cache = "miss"
        cache.store(cache_dir, key, prepared.train, prepared.eval, asdict(prepared.report))
    return prepared


def _read(data: DataConfig) -> tuple[list[Row], Skipped]:
    skipped = Skipped()
    rows = [map_columns(row, data.columns) for row in read_rows(data, skipped)]
    if not rows:
        raise ConfigError(f"{data.path}: no rows")
    return rows, skipped


def _shuffled_pick(n: int, max_samples: int | None, seed: int) -> list[int]:
    """Row indices in the run's shuffled order, at most max_samples of them."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order[:max_samples] if max_samples else order


def _prepare(data: DataConfig, tokenizer, max_seq_len: int, seed: int, template: str) -> PreparedData:
    rows, skipped = _read(data)
    choice = FormatChoice(data.format, "set in the config") if data.format != "auto" else detect_format(rows)
    report = DataReport(format=choice.name, format_reason=choice.reason, chat_template=template,
                        unused_columns=unused_columns(rows, choice.name),
                        rows_read=len(rows) + sum(skipped.reasons.values()))
    for reason, n in skipped.reasons.items():
        report.drop(reason, n)
    picked = _shuffled_pick(len(rows), data.max_samples, seed)
    abilities = template_abilities(tokenizer)
    by_row: dict[int, list[TokenizedSample]] = {}
    for index in sorted(picked):  # in file order, so that the first bad row named is the first in the file
        samples = _row_samples(rows[index], choice.name, data, tokenizer, max_seq_len, abilities, report)
        if samples:
            by_row[index] = samples
    report.kept = len(by_row)
    return _split([s for i in picked for s in by_row.get(i, [])], data, report)


def _row_samples(row: Row, fmt: str, data: DataConfig, tokenizer, max_seq_len: int, abilities: TemplateAbilities,
                 report: DataReport) -> list[TokenizedSample]:
    """The tokenized samples of one row: none (dropped, counted), one, or a long document's chunks."""
    try:
        sample = to_sample(row, fmt, data.system_prompt)
        if blank_turn(sample):
            report.drop("blank answer")
            return []
        check_renderable(sample, abilities, row.where)
        tokenized = tokenize_sample(sample, tokenizer, row.where, data.train_on_prompt)
    except ConfigError:
        if not data.skip_bad_rows:
            raise
        report.drop("malformed row")
        return []
    if "text" in sample:
        chunks = split_document(tokenized, max_seq_len)
        if len(chunks) > 1:
            report.documents_split += 1
            report.chunks += len(chunks)
        return chunks
    fitted = fit_length(tokenized, max_seq_len, data.too_long)
    if fitted is None:
        report.drop(f"longer than max_seq_len={max_seq_len}" if data.too_long == "drop"
                    else f"no answer token within max_seq_len={max_seq_len}")
        return []
    report.truncated += fitted is not tokenized
    return [fitted]


def _split(samples: list[TokenizedSample], data: DataConfig, report: DataReport) -> PreparedData:
    """Hold out the first eval_fraction of the shuffled samples (a long document's chunks stay together)."""
    if not samples:
        raise ConfigError(f"{data.path}: no usable samples remain (dropped: {report.dropped})")
    n_eval = int(round(len(samples) * data.eval_fraction))
    if data.eval_fraction > 0 and len(samples) > 1:
        n_eval = max(1, n_eval)
    eval_samples, train_samples = samples[:n_eval], samples[n_eval:]
    if not train_samples:
        raise ConfigError(f"{data.path}: no training samples left after holding out eval_fraction={data.eval_fraction}")
    report.train_samples, report.eval_samples = len(train_samples), len(eval_samples)
    report.train_tokens = sum(len(s.input_ids) for s in train_samples)
    return PreparedData(train_samples, eval_samples, report)
