"""Build the preference demo's pairs from the quickstart dataset (src/snugtune/bundled/stdlib_functions.jsonl):
for each "write this function" task, the real function (chosen) against an unfinished or buggy one (rejected).

The prompt is the quickstart's instruction cut to the docstring's first paragraph, so that more prompts and
answers fit the demo's 192 tokens. The wrong answer keeps the task's own `def` line and differs only in the body:
  - its last statement dropped (a function that stops one statement early, most often before its `return`),
    where the body has two statements or more;
  - else a bug planted: a comparison, an arithmetic operator, a boolean or a None test turned around.
The embedded SmolLM2 prefers the unfinished body on most pairs (fewer tokens, fewer log-probabilities summed),
so the demo has room to move; another function's body under the def line, which the base model already
rejected on most pairs, taught little. Deterministic (no randomness): the same input gives the same pairs.
Run:  python scripts/build_preference_pairs.py
(writes src/snugtune/bundled/stdlib_pairs.jsonl; docs/preference.md describes it and measures the demo).
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

from build_stdlib_dataset import DOCSTRING_FOLLOWS, write_rows  # scripts/build_stdlib_dataset.py

BUNDLED = Path(__file__).resolve().parent.parent / "src" / "snugtune" / "bundled"
SOURCE = BUNDLED / "stdlib_functions.jsonl"
OUT = BUNDLED / "stdlib_pairs.jsonl"

# (pattern, replacement), tried in order on the body: the first that changes something plants the bug
BUGS = [(r" < ", " >= "), (r" <= ", " > "), (r" > ", " <= "), (r" >= ", " < "), (r" == ", " != "),
        (r" != ", " == "), (r" is None", " is not None"), (r" is not None", " is None"), (r" \+ 1\b", " - 1"),
        (r" - 1\b", " + 1"), (r"\bTrue\b", "False"), (r"\bFalse\b", "True"), (r" \+ ", " - "), (r" and ", " or ")]


def short_prompt(instruction: str) -> str:
    """The task with only the docstring's first paragraph."""
    task, _, docstring = instruction.partition(DOCSTRING_FOLLOWS)
    first = docstring.split("\n\n")[0]
    return f"{task} Its docstring begins:\n\n{first}" if first else task


def split_function(code: str) -> tuple[str, str]:
    """(the def line(s) up to the body, the body; empty for a one-line function)."""
    lines = code.splitlines()
    first_body = next((i for i in range(1, len(lines)) if not lines[i - 1].rstrip().endswith(",")), len(lines))
    return "\n".join(lines[:first_body]), "\n".join(lines[first_body:])


def without_last_line(code: str) -> str | None:
    """The function up to the end of its body's second-to-last statement (comments after it dropped too), where
    the body's last statement is one line; else None."""
    body = ast.parse(code).body[0].body
    if len(body) < 2 or body[-1].lineno != body[-1].end_lineno:
        return None
    return "\n".join(code.splitlines()[:body[-2].end_lineno])


def planted_bug(code: str) -> str | None:
    """The function with the first matching operator of its body turned around (its first occurrence), or None."""
    header, body = split_function(code)
    for pattern, replacement in BUGS:
        changed = re.sub(pattern, replacement, body, count=1)
        if changed != body:
            return f"{header}\n{changed}"
    return None


def build_pairs(rows: list[dict]) -> list[dict]:
    """The quickstart's rows as pairs (those with no wrong answer that differs from the real one left out)."""
    pairs = []
    for row in rows:
        wrong = without_last_line(row["output"]) or planted_bug(row["output"])
        if wrong is not None and wrong != row["output"]:
            pairs.append({"prompt": short_prompt(row["instruction"]), "chosen": row["output"], "rejected": wrong})
    return pairs


def main() -> None:
    rows = [json.loads(line) for line in SOURCE.read_text(encoding="utf-8").splitlines() if line.strip()]
    pairs = build_pairs(rows)
    write_rows(OUT, pairs)
    print(f"{len(pairs)} pairs from {SOURCE.name} -> {OUT}")


if __name__ == "__main__":
    main()
