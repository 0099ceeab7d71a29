"""A raw row as read from a data file, tagged with where it came from, and the count of rows skipped."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Row:
    """One raw row and where it came from (file and 1-based line or row number)."""
    where: str
    value: object


MEDIA_KEYS = ("images", "image", "videos", "video", "audios", "audio")  # fields of multimodal rows


def plain_key(key) -> str:
    """A column name in lower case without a leading '###' (ChatDoctor's `### Instruction`)."""
    return str(key).lower().lstrip("#").strip()


def plain_keys(value: dict) -> dict[str, object]:
    """The row's fields by plain name."""
    return {plain_key(k): v for k, v in value.items()}


@dataclass
class Skipped:
    """Rows skipped under data.skip_bad_rows, by reason."""
    reasons: dict[str, int] = field(default_factory=dict)

    def add(self, reason: str) -> None:
        self.reasons[reason] = self.reasons.get(reason, 0) + 1
