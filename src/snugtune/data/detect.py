"""Which format rows are in, from their keys; and the kinds of data we refuse rather than misread.

Keys are compared without case and without a leading `###` (ChatDoctor's `### Instruction`).
"""

from __future__ import annotations

from dataclasses import dataclass

from snugtune.errors import ConfigError
from snugtune.data.format_registry import FORMATS, LABELLED, PAIRS, fields_read
from snugtune.data.rows import MEDIA_KEYS, Row, plain_key, plain_keys

ROWS_LOOKED_AT = 20


@dataclass
class FormatChoice:
    name: str
    reason: str


def _media(keys: dict) -> str | None:
    return next((k for k in MEDIA_KEYS if keys.get(k)), None)


# Kinds of data that a format must produce to read them, and why another format is refused them (a format
# that produces one of these kinds, its registry entry's `produces`, takes its rows).
REFUSALS = (
    (PAIRS, lambda keys: "chosen" in keys and "rejected" in keys,
     lambda keys: "preference pairs (chosen/rejected), which the other formats would train the rejected answers of "
                  "as good ones: train them with objective: dpo, orpo or kto (data.format: preference), or map the "
                  "chosen answers alone with data.columns: {completion: chosen}"),
    (LABELLED, lambda keys: isinstance(keys.get("label"), bool),
     lambda keys: "labelled completions (KTO: rows with a true/false 'label'), whose 'bad' answers the other "
                  "formats would train as good ones: train them with objective: kto (data.format: kto)"),
    ("stepwise supervision", lambda keys: "completions" in keys and "labels" in keys,
     lambda keys: "stepwise supervision data ('completions' with 'labels', for process reward models)"),
    ("multimodal", _media,
     lambda keys: f"multimodal data (a '{_media(keys)}' column): snugtune trains text models, and the media would "
                  f"be lost while its <image> markers are trained as text"),
)


def refusal(value: dict, fmt: str | None = None) -> str | None:
    """Why rows like this one cannot be trained as format `fmt` (None: they can)."""
    keys = plain_keys(value)
    produces = FORMATS[fmt].produces if fmt in FORMATS else None
    return next((reason(keys) for kind, matches, reason in REFUSALS if kind != produces and matches(keys)), None)


def refuse_kind(row: Row, fmt: str | None = None) -> None:
    if isinstance(row.value, dict):
        reason = refusal(row.value, fmt)
        if reason:
            raise ConfigError(f"{row.where}: {reason}")


def _vote(keys: dict[str, object]) -> tuple[str, str] | None:
    """The first format (in the registry's order) that recognises the row, and why."""
    for name, entry in FORMATS.items():
        reason = entry.detect(keys)
        if reason:
            return name, reason
    return None


def unused_columns(rows: list[Row], fmt: str) -> list[str]:
    """Columns of the first rows that the format does not read (said out loud: a column may hold what a
    field should, under another name)."""
    seen = dict.fromkeys(str(k) for row in rows[:ROWS_LOOKED_AT] if isinstance(row.value, dict) for k in row.value)
    read = fields_read(fmt)
    return [k for k in seen if plain_key(k) not in read]


def detect_format(rows: list[Row]) -> FormatChoice:
    """Pick the format from the keys of the first rows; ConfigError when ambiguous, unknown or refused."""
    votes: dict[str, str] = {}
    seen: list[str] = []
    for row in rows[:ROWS_LOOKED_AT]:
        if not isinstance(row.value, dict):
            raise ConfigError(f"{row.where}: expected an object with fields, got {type(row.value).__name__}")
        seen += [str(k) for k in row.value if str(k) not in seen]
        vote = _vote(plain_keys(row.value))
        refuse_kind(row, vote[0] if vote else None)
        if vote:
            votes.setdefault(*vote)
    for name in list(votes):
        if any(other in votes for other in FORMATS[name].gives_way_to):
            votes.pop(name)
    if len(votes) == 1:
        return FormatChoice(*next(iter(votes.items())))
    where = rows[0].where.rsplit(":", 1)[0] if rows else "data"
    if not votes:
        raise ConfigError(f"{where}: cannot tell the data format from the keys of the first rows "
                          f"({', '.join(seen) or 'none'}); set data.format ({', '.join(FORMATS)}) or map "
                          f"your columns with data.columns")
    raise ConfigError(f"{where}: rows look like several formats ({', '.join(sorted(votes))}); set data.format")
