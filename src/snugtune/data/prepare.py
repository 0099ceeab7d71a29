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
from snugtune.data.normalize import nothing_to_train, to_sample, without_blank_answers
from snugtune.data.prep_report import DataReport
from snugtune.data.rows import Row
from snugtune.data.sources import HUB_ID, DataSource, content_digest, locate, read_source
from snugtune.data.templates import (TemplateAbilities, check_renderable, fit_to_template, set_chat_template,
                                     template_abilities)
from snugtune.data.tokenize import TokenizedSample, char_budget, fit_length, split_document, tokenize_sample
from snugtune.data.turn_fields import turn_field_uses, turn_keys


@dataclass
class PreparedData:
    train: list[TokenizedSample]
    eval: list[TokenizedSample]
    report: DataReport
    content_digest: str  # sha256 of the data read (its files' bytes; a hub dataset's rows): changes with the data


def prepare_data(data: DataConfig, tokenizer, max_seq_len: int, seed: int, cache_dir: Path | None = None) -> PreparedData:
    """Read, normalize, tokenize, length-fit and split the data. ConfigError on bad input.

    Sets tokenizer.chat_template to the template the run trains with (and saves beside the adapter).
    With cache_dir, the result of local data is stored under a key of (data content, code version,
    tokenizer, template, max_seq_len, data settings) and reused by the next run with the same key; hub
    datasets have their own cache.
    """
    template = set_chat_template(tokenizer, data)
    source = locate(data)
    digest = content_digest(source) if source.kind != HUB_ID else None
    key = None
    if cache_dir is not None and digest is not None:
        key = cache.cache_key(digest, data, tokenizer, max_seq_len, seed)
        hit = cache.load_cached(cache_dir, key)
        if hit is not None:
            train, eval_, report = hit
            return PreparedData(train, eval_, DataReport(**{**report, "cache": "hit"}), digest)
    rows, skipped = read_source(source, data)
    digest = digest or content_digest(source, rows)
    report = DataReport(rows_read=len(rows) + sum(skipped.reasons.values()), chat_template=template)
    for reason, n in skipped.reasons.items():
        report.drop(reason, n)
    prepared = _prepare(rows, source, data, tokenizer, max_seq_len, seed, report, digest)
    if key is not None:
        prepared.report.cache = "miss"
        cache.store(cache_dir, key, prepared.train, prepared.eval, asdict(prepared.report))
    return prepared


def _shuffled_pick(n: int, max_samples: int | None, seed: int) -> list[int]:
    """Row indices in the run's shuffled order, at most max_samples of them."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order[:max_samples] if max_samples else order


def _prepare(rows: list[Row], source: DataSource, data: DataConfig, tokenizer, max_seq_len: int, seed: int,
             report: DataReport, digest: str) -> PreparedData:
    rows = [map_columns(row, source.columns) for row in rows]
    if not rows:
        raise ConfigError(f"{data.path}: no rows")
    choice = FormatChoice(data.format, "set in the config") if data.format != "auto" else \
        source.format or detect_format(rows)
    abilities = template_abilities(tokenizer)
    report.format, report.format_reason, report.source_notes = choice.name, choice.reason, source.notes
    report.unused_columns = unused_columns(rows, choice.name)
    report.turn_fields = turn_field_uses(turn_keys(rows, choice.name), data.reasoning, abilities.reasoning_key,
                                         abilities.names)
    picked = _shuffled_pick(len(rows), source.max_samples, seed)
    fit = _Fit(max_seq_len, char_budget(tokenizer, max_seq_len))
    by_row: dict[int, list[TokenizedSample]] = {}
    for index in sorted(picked):  # in file order, so that the first bad row named is the first in the file
        samples = _row_samples(rows[index], choice.name, data, tokenizer, fit, abilities, report)
        if samples:
            by_row[index] = samples
    report.kept = len(by_row)
    return _split([s for i in picked for s in by_row.get(i, [])], data, report, digest)


@dataclass(frozen=True)
class _Fit:
    max_seq_len: int
    max_chars: int  # rendered text past this holds only tokens past max_seq_len (tokenize.char_budget)


def _row_samples(row: Row, fmt: str, data: DataConfig, tokenizer, fit: _Fit, abilities: TemplateAbilities,
                 report: DataReport) -> list[TokenizedSample]:
    """The tokenized samples of one row: none (dropped, counted), one, or a long document's chunks."""
    try:
        sample, blanks = without_blank_answers(to_sample(row, fmt, data.system_prompt, data.reasoning))
        empty = nothing_to_train(sample, blanks)
        if empty:
            report.drop(empty)
            return []
        merged = 0
        if "messages" in sample:
            check_renderable(sample, abilities, row.where)
            messages, merged = fit_to_template(sample["messages"], abilities)
            sample = {**sample, "messages": messages}
        tokenized = tokenize_sample(sample, tokenizer, row.where, data.train_on_prompt, fit.max_chars)
    except ConfigError:
        if not data.skip_bad_rows:
            raise
        report.drop("malformed row")
        return []
    if "text" in sample:
        chunks = split_document(tokenized, fit.max_seq_len)
        if len(chunks) > 1:
            report.documents_split += 1
            report.chunks += len(chunks)
        return chunks
    fitted = fit_length(tokenized, fit.max_seq_len, data.too_long)
    if fitted is None:
        report.drop(f"longer than max_seq_len={fit.max_seq_len}" if data.too_long == "drop"
                    else f"no answer token within max_seq_len={fit.max_seq_len}")
        return []
    report.truncated += fitted is not tokenized
    report.blank_answers += blanks
    report.merged_turns += merged
    return [fitted]


def _split(samples: list[TokenizedSample], data: DataConfig, report: DataReport, digest: str) -> PreparedData:
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
    return PreparedData(train_samples, eval_samples, report, digest)
