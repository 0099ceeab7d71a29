"""The data path: rows -> normalized samples -> tokenized samples -> train/eval splits. Preference rows become
tokenized pairs (dpo, orpo) or labelled completions (kto; pairs unpaired into two) instead of samples."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from snugtune.config import DataConfig
from snugtune.errors import ConfigError
from snugtune.data import cache
from snugtune.data.columns import map_columns
from snugtune.data.detect import FormatChoice, detect_format, unused_columns
from snugtune.data.format_registry import FORMATS
from snugtune.data.normalize import nothing_to_train, to_sample, without_blank_answers, without_reasoning
from snugtune.data.preference_rows import (LABELLED, PAIRS, LabelledCompletion, PreferencePair, SameAnswers,
                                           check_labels_readable, check_objective, unpair, with_system_prompt)
from snugtune.data.preference_tokenize import (TokenizedCompletion, TokenizedPair, fit_completion, fit_pair,
                                               kl_partners, tokenize_labelled, tokenize_pair)
from snugtune.data.prep_report import DataReport
from snugtune.data.rows import Row, plain_keys
from snugtune.data.sources import HUB_ID, DataSource, content_digest, locate, read_source
from snugtune.data.templates import (TemplateAbilities, check_renderable, fit_to_template, set_chat_template,
                                     template_abilities)
from snugtune.data.tokenize import TokenizedSample, char_budget, fit_length, split_document, tokenize_sample
from snugtune.data.turn_fields import turn_field_uses, turn_keys


Example = TokenizedSample | TokenizedPair | TokenizedCompletion  # what a row of training data holds


@dataclass
class PreparedData:
    train: list[Example]  # objective sft: samples; dpo, orpo: pairs; kto: labelled completions
    eval: list[Example]
    report: DataReport
    content_digest: str  # sha256 of the data read (its files' bytes; a hub dataset's rows): changes with the data


def prepare_data(data: DataConfig, tokenizer, max_seq_len: int, seed: int, cache_dir: Path | None = None,
                 objective: str = "sft") -> PreparedData:
    """Read, normalize, tokenize, length-fit and split the data for `objective`. ConfigError on bad input, and
    on data of a kind the objective does not train (preference pairs under sft, ...).

    Sets tokenizer.chat_template to the template the run trains with (and saves beside the adapter).
    With cache_dir, the result of local data is stored under a key of (data content, code version,
    tokenizer, template, max_seq_len, data settings, objective) and reused by the next run with the same key; hub
    datasets have their own cache.
    """
    template = set_chat_template(tokenizer, data)
    source = locate(data)
    digest = content_digest(source) if source.kind != HUB_ID else None
    key = None
    if cache_dir is not None and digest is not None:
        key = cache.cache_key(digest, data, tokenizer, max_seq_len, seed, objective)
        hit = cache.load_cached(cache_dir, key)
        if hit is not None:
            train, eval_, report = hit
            return PreparedData(train, eval_, DataReport(**{**report, "cache": "hit"}), digest)
    rows, skipped = read_source(source, data)
    digest = digest or content_digest(source, rows)
    report = DataReport(rows_read=len(rows) + sum(skipped.reasons.values()), chat_template=template)
    for reason, n in skipped.reasons.items():
        report.drop(reason, n)
    prepared = _prepare(rows, source, data, tokenizer, max_seq_len, seed, report, digest, objective)
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
             report: DataReport, digest: str, objective: str) -> PreparedData:
    rows = [map_columns(row, source.columns) for row in rows]
    if not rows:
        raise ConfigError(f"{data.path}: no rows")
    choice = FormatChoice(data.format, "set in the config") if data.format != "auto" else \
        source.format or detect_format(rows)
    kind = FORMATS[choice.name].produces if choice.name in FORMATS else None
    preference = kind in (PAIRS, LABELLED)
    if not preference:
        check_labels_readable(rows, objective)
    check_objective(kind if preference else "sft", objective, data.path)
    abilities = template_abilities(tokenizer)
    report.format, report.format_reason, report.source_notes = choice.name, choice.reason, source.notes
    report.unused_columns = unused_columns(rows, choice.name)
    report.turn_fields = turn_field_uses(turn_keys(rows, choice.name), data.reasoning, abilities.reasoning_key,
                                         abilities.names)
    picked = _shuffled_pick(len(rows), source.max_samples, seed)
    fit = _Fit(max_seq_len, char_budget(tokenizer, max_seq_len))
    by_row: dict[int, list[Example]] = {}
    for index in sorted(picked):  # in file order, so that the first bad row named is the first in the file
        if preference:
            examples = _row_examples(rows[index], choice.name, data, tokenizer, fit, abilities, report, objective)
        else:
            examples = _row_samples(rows[index], choice.name, data, tokenizer, fit, abilities, report)
        if examples:
            by_row[index] = examples
    report.kept = len(by_row)
    if preference:  # a row's examples (a pair unpaired for kto) stay on one side of the split
        return _split([by_row[i] for i in picked if i in by_row], data, report, digest, max_seq_len)
    return _split([[s] for i in picked for s in by_row.get(i, [])], data, report, digest, max_seq_len)


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


def _row_examples(row: Row, fmt: str, data: DataConfig, tokenizer, fit: _Fit, abilities: TemplateAbilities,
                  report: DataReport, objective: str) -> list[Example]:
    """The tokenized examples of one preference row: a pair; under kto a labelled completion, or a pair's two
    answers unpaired (TRL's unpair_preference_dataset); none where the row is dropped (counted), as a pair whose
    answers are the same is."""
    try:
        if not isinstance(row.value, dict):
            raise ConfigError(f"{row.where}: expected an object with fields, got {type(row.value).__name__}")
        example = with_system_prompt(FORMATS[fmt].read(row, plain_keys(row.value)), data.system_prompt)
        example, merged = _fit_example(example, abilities, data.reasoning, row.where)
        if isinstance(example, PreferencePair) and objective != "kto":
            whole = [tokenize_pair(example, tokenizer, row.where)]
        else:
            halves = unpair(example) if isinstance(example, PreferencePair) else (example,)
            whole = [tokenize_labelled(half, tokenizer, row.where) for half in halves]
    except SameAnswers:
        report.drop("chosen and rejected the same")
        return []
    except ConfigError:
        if not data.skip_bad_rows:
            raise
        report.drop("malformed row")
        return []
    fitted = [(fit_pair if isinstance(e, TokenizedPair) else fit_completion)(e, fit.max_seq_len, data.too_long)
              for e in whole]
    for _ in range(fitted.count(None)):
        report.drop(f"longer than max_seq_len={fit.max_seq_len}" if data.too_long == "drop"
                    else f"no answer token within max_seq_len={fit.max_seq_len}")
    report.truncated += sum(f is not None and f is not e for f, e in zip(fitted, whole))
    kept = [f for f in fitted if f is not None]
    report.merged_turns += merged if kept else 0
    return kept


def _fit_example(example: PreferencePair | LabelledCompletion, abilities: TemplateAbilities, reasoning: str,
                 where: str) -> tuple[PreferencePair | LabelledCompletion, int]:
    """The example's turns as the template renders them, as for supervised rows, and how many were merged:
    refused where the template would lose its tool data, same-role turns merged where it refuses them,
    reasoning placed (fit_to_template) or, with data.reasoning: drop, left out."""
    names = ("prompt", "chosen", "rejected") if isinstance(example, PreferencePair) else ("prompt", "completion")
    parts = {name: getattr(example, name) for name in names}
    check_renderable({"messages": [m for part in parts.values() for m in part], "tools": example.tools}, abilities,
                     where)
    if reasoning == "drop":
        parts = {name: without_reasoning(part) for name, part in parts.items()}
    fitted = {name: fit_to_template(part, abilities) for name, part in parts.items()}
    merged = sum(n for _, n in fitted.values())
    return replace(example, **{name: messages for name, (messages, _) in fitted.items()}), merged


def _split(units: list[list[Example]], data: DataConfig, report: DataReport, digest: str,
           max_seq_len: int) -> PreparedData:
    """Hold out the first eval_fraction of the shuffled units (a unit's examples stay together on one side).
    Each side lists the units' first examples, then their second ones (a kto pair's rejected answers after
    the chosen ones, as TRL unpairs them); KTO rows get their mismatched completions (kl_partners)."""
    if not units:
        raise ConfigError(f"{data.path}: no usable samples remain (dropped: {report.dropped})")
    n_eval = int(round(len(units) * data.eval_fraction))
    if data.eval_fraction > 0 and len(units) > 1:
        n_eval = max(1, n_eval)
    flat = lambda part: [u[k] for k in range(max(map(len, part), default=0)) for u in part if len(u) > k]  # noqa: E731
    eval_samples, train_samples = flat(units[:n_eval]), flat(units[n_eval:])
    if not train_samples:
        raise ConfigError(f"{data.path}: no training samples left after holding out eval_fraction={data.eval_fraction}")
    for side in (train_samples, eval_samples):
        if side and isinstance(side[0], TokenizedCompletion):
            kl_partners(side, max_seq_len)
    report.train_samples, report.eval_samples = len(train_samples), len(eval_samples)
    report.train_tokens = sum(s.length for s in train_samples)
    return PreparedData(train_samples, eval_samples, report, digest)
