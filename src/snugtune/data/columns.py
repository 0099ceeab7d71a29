"""data.columns: the file's column names mapped to the fields of our formats, before anything else looks
at a row (as LLaMA-Factory's dataset_info `columns` and Axolotl's field mappings do)."""

from __future__ import annotations

from snugtune.errors import ConfigError
from snugtune.data.format_registry import TURN_FIELDS, turn_list_fields
from snugtune.data.rows import Row


def map_columns(row: Row, columns: dict[str, str]) -> Row:
    """The row with each mapped column renamed to its field; a mapped column missing from a row is an error."""
    if not columns or not isinstance(row.value, dict):
        return row
    value = dict(row.value)
    row_fields = {f: c for f, c in columns.items() if f not in TURN_FIELDS}
    for field, column in row_fields.items():
        if column not in value:
            raise ConfigError(f"{row.where}: no column '{column}' (data.columns.{field}); the row has "
                              f"{', '.join(map(str, row.value))}")
    renamed = {k: v for k, v in value.items() if k not in row_fields.values()}
    renamed.update({field: value[column] for field, column in row_fields.items()})
    turn_keys = {c: f for f, c in columns.items() if f in TURN_FIELDS}
    for key in turn_list_fields():
        if turn_keys and isinstance(renamed.get(key), list):
            renamed[key] = [_rename_turn(turn, turn_keys) for turn in renamed[key]]
    return Row(row.where, renamed)


def _rename_turn(turn, turn_keys: dict[str, str]):
    if not isinstance(turn, dict):
        return turn
    return {turn_keys.get(k, k): v for k, v in turn.items()}
