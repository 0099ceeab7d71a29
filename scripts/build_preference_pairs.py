"""Build the preference demo's pairs from the quickstart dataset (src/snugtune/bundled/stdlib_functions.jsonl):
for each "write this function" task, the real function (chosen) against a plausible wrong one (rejected).

The wrong answer keeps the task's own `def` line, so the two differ only in the body:
  - even rows: another function's body (from half the file away, the first there from another module),
  - odd rows: the real body with a bug planted: a comparison, an arithmetic operator, a boolean or a None test
    turned around, or else its last statement dropped.
Deterministic (no randomness): the same input gives the same pairs. Run:  python scripts/build_preference_pairs.py
(writes src/snugtune/bundled/stdlib_pairs.jsonl; docs/preference.md describes it).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from build_stdlib_dataset import write_rows  # scripts/build_stdlib_dataset.py

BUNDLED = Path(__file__).resolve().parent.parent / "src" / "snugtune" / "bundled"
SOURCE = BUNDLED / "stdlib_functions.jsonl"
OUT = BUNDLED / "stdlib_pairs.jsonl"

# (pattern, replacement), tried in order on the body: the first that changes something plants the bug
BUGS = [(r" < ", " >= "), (r" <= ", " > "), (r" > ", " <= "), (r" >= ", " < "), (r" == ", " != "),
        (r" != ", " == "), (r" is None", " is not None"), (r" is not None", " is None"), (r" \+ 1\b", " - 1"),
        (r" - 1\b", " + 1"), (r"\bTrue\b", "False"), (r"\bFalse\b", "True"), (r" \+ ", " - "), (r" and ", " or ")]


def split_function(code: str) -> tuple[str, str]:
    """(the def line(s) up to the body, the body)."""
    lines = code.splitlines()
    first_body = next(i for i, line in enumerate(lines) if i > 0 and not lines[i - 1].rstrip().endswith(","))
    return "\n".join(lines[:first_body]), "\n".join(lines[first_body:])


def planted_bug(body: str) -> str | None:
    """The body with its first matching operator turned around (only its first occurrence), or None."""
    for pattern, replacement in BUGS:
        changed = re.sub(pattern, replacement, body, count=1)
        if changed != body:
            return changed
    return None


def without_last_statement(body: str) -> str | None:
    lines = body.splitlines()
    return "\n".join(lines[:-1]) if len(lines) > 2 else None


def module_of(row: dict) -> str:
    return re.search(r"module `([^`]+)`", row["instruction"]).group(1)


def rejected_answer(rows: list[dict], i: int) -> str:
    header, body = split_function(rows[i]["output"])
    if i % 2:
        wrong = planted_bug(body) or without_last_statement(body)
        if wrong is not None:
            return f"{header}\n{wrong}"
    half = i + len(rows) // 2
    others = [j for j in range(half, half + len(rows)) if module_of(rows[j % len(rows)]) != module_of(rows[i])]
    other = rows[(others[0] if others else i + 1) % len(rows)]
    return f"{header}\n{split_function(other['output'])[1]}"


def build_pairs(rows: list[dict]) -> list[dict]:
    """The quickstart's rows as pairs (those whose wrong answer came out identical left out)."""
    pairs = [{"prompt": row["instruction"], "chosen": row["output"], "rejected": rejected_answer(rows, i)}
             for i, row in enumerate(rows)]
    return [p for p in pairs if p["chosen"] != p["rejected"]]


def main() -> None:
    rows = [json.loads(line) for line in SOURCE.read_text(encoding="utf-8").splitlines() if line.strip()]
    pairs = build_pairs(rows)
    write_rows(OUT, pairs)
    print(f"{len(pairs)} pairs from {SOURCE.name} -> {OUT}")


if __name__ == "__main__":
    main()
