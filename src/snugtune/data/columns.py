"""The file's names mapped onto the fields of our formats before anything else looks at a row: data.columns,
and a LLaMA-Factory dataset_info.json entry's `columns` and `tags` (as Axolotl's field mappings do)."""

from __future__ import annotations

from dataclasses import dataclass, field

from snugtune.errors import ConfigError
from snugtune.data.format_registry import TURN_FIELDS, turn_list_fields
from snugtune.data.rows import Row


@dataclass(frozen=True)
class ColumnMap:
    fields: dict[str, str] = field(default_factory=dict)  # FIELD -> the file's COLUMN (role/content: a turn's key)
    roles: dict[str, str] = field(default_factory=dict)  # a turn's role name in the file -> ours (user, assistant, ...)
    optional: frozenset[str] = frozenset()  # fields whose column a row may lack (dataset_info.json's are optional)

    def merged(self, columns: dict[str, str]) -> "ColumnMap":
        """This map with data.columns over it (its columns are required)."""
        return ColumnMap({**self.fields, **columns}, self.roles, self.optional - set(columns))

    def describe(self) -> str:
        """The mapping as the report says it: 'question -> instruction, speaker -> role'."""
        pairs = [f"{column} -> {name}" for name, column in self.fields.items() if column != name]
        return ", ".join(pairs + [f"role '{theirs}' -> {ours}" for theirs, ours in self.roles.items()])


def map_columns(row: Row, mapping: ColumnMap) -> Row:
    """The row with each mapped column renamed to its field; a required mapped column missing is an error."""
    if not (mapping.fields or mapping.roles) or not isinstance(row.value, dict):
        return row
    value = dict(row.value)
    row_fields = {f: c for f, c in mapping.fields.items() if f not in TURN_FIELDS and (c in value or
                                                                                      f not in mapping.optional)}
    for name, column in row_fields.items():
        if column not in value:
            raise ConfigError(f"{row.where}: no column '{column}' (data.columns.{name}); the row has "
                              f"{', '.join(map(str, row.value))}")
    renamed = {k: v for k, v in value.items() if k not in row_fields.values()}
    renamed.update({name: value[column] for name, column in row_fields.items()})
    turn_keys = {c: f for f, c in mapping.fields.items() if f in TURN_FIELDS}
    for key in turn_list_fields():
        if (turn_keys or mapping.roles) and isinstance(renamed.get(key), list):
            renamed[key] = [_rename_turn(turn, turn_keys, mapping.roles) for turn in renamed[key]]
        elif (turn_keys or mapping.roles) and isinstance(renamed.get(key), dict):  # one message: a chosen answer
            renamed[key] = _rename_turn(renamed[key], turn_keys, mapping.roles)
    return Row(row.where, renamed)


def _rename_turn(turn, turn_keys: dict[str, str], roles: dict[str, str]):
    if not isinstance(turn, dict):
        return turn
    renamed = {turn_keys.get(k, k): v for k, v in turn.items()}
    for key in ("role", "from"):
        if isinstance(renamed.get(key), str) and renamed[key] in roles:
            renamed[key] = roles[renamed[key]]
    return renamed
