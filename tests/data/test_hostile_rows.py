"""Odd and hostile inputs, generated from fixed seeds: whatever a row, a turn, a CSV or a line holds, the data
path reads it as meant or refuses it with one ConfigError naming where; it never fails otherwise."""

import csv
import io
import json
import random

import pytest

from conftest import prepare, trained_text, write_jsonl
from snugtune.data import turns
from snugtune.data.files import CSV_SEPARATORS, sniff_separator
from snugtune.data.format_registry import FORMATS
from snugtune.data.normalize import to_sample, without_blank_answers
from snugtune.data.preference_rows import LABELLED, PAIRS
from snugtune.data.rows import Row, plain_keys
from snugtune.errors import ConfigError

KEYS = ["role", "from", "content", "value", "tool_calls", "weight", "train", "loss_weight", "name", "thinking",
        "reasoning_content", "type", "text", "instruction", "input", "output", "history", "system", "tools",
        "messages", "conversations", "prompt", "completion", "problem", "solution", "label", "chosen", "images",
        "function", "arguments", "id", "### Instruction", "", "rejected", "kto_tag", "chosen_response", "question"]
ATOMS = [None, True, False, 0, 1, 0.5, -1, 10**30, float("nan"), "", " ", "user", "assistant", "gpt", "human",
         "system", "tool", "function_call", "observation", "text", "reasoning", "image_url", "tool_call", "{", "[]",
         '{"name": "f", "arguments": {}}', "### Human: hi ### Assistant: yo", "\x00", "é" * 3]


def hostile(rng: random.Random, depth: int = 0):
    """A JSON value built from the names our formats read, nested a few levels."""
    pick = rng.random()
    if depth > 3 or pick < 0.35:
        return rng.choice(ATOMS)
    if pick < 0.6:
        return [hostile(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {rng.choice(KEYS): hostile(rng, depth + 1) for _ in range(rng.randint(0, 5))}


VALID = {  # a rich row of each format, mutated below
    "alpaca": {"instruction": "Add 2 and 3.", "input": "Integers.", "output": "5", "system": "Be brief.",
               "history": [["Hi", "Hello."]]},
    "messages": {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi", "name": "A"},
                              {"role": "assistant", "content": [{"type": "text", "text": "Hello."}], "weight": 1,
                               "reasoning_content": "Greet."},
                              {"role": "assistant", "tool_calls": [{"type": "function", "function": {
                                  "name": "f", "arguments": "{}"}}]},
                              {"role": "tool", "content": "ok", "tool_call_id": "1"}], "tools": []},
    "sharegpt": {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello.", "train": True},
                                   {"from": "function_call", "value": '{"name": "f", "arguments": {}}'},
                                   {"from": "observation", "value": "ok"}]},
    "prompt-completion": {"prompt": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
                          "completion": [{"role": "assistant", "content": [{"type": "reasoning", "value": "R"},
                                                                           {"type": "text", "value": "B"}]}]},
    "guanaco": {"text": "Context.### Human: Hi### Assistant: Hello."},
    "text": {"text": "Call me Ishmael."},
    "preference": {"conversations": [{"from": "human", "value": "Hi"}], "system": "Be brief.",
                   "chosen": {"from": "gpt", "value": "Hello."},
                   "rejected": [{"role": "assistant", "content": "", "tool_calls": [{"function": {
                       "name": "f", "arguments": "{}"}}]}, {"role": "tool", "content": "ok"},
                                {"role": "assistant", "content": "Go away."}]},
    "preference-implicit": {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.",
                            "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."},
    "kto": {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
            "label": "yes", "tools": []},
}


def _well_formed(messages) -> None:
    for message in messages:
        assert message["role"] in ("system", "user", "assistant", "tool") and isinstance(message["content"], str)
        assert message.get("train", True) in (True, False) and isinstance(message.get("reasoning_content", ""), str)


def _read(value, fmt: str, rng: random.Random) -> list[list[dict]]:
    """The row read as `fmt` reads it: its messages, or a preference example's prompt and answers."""
    row = Row(f"d.jsonl:{rng.random()}", value)
    if FORMATS[fmt].produces in (PAIRS, LABELLED):
        example = FORMATS[fmt].read(row, plain_keys(value) if isinstance(value, dict) else {})
        answers = [example.chosen, example.rejected] if FORMATS[fmt].produces == PAIRS else [example.completion]
        assert example.prompt[-1]["role"] in ("user", "tool") and all(a[0]["role"] == "assistant" for a in answers)
        return [example.prompt, *answers]
    sample, _ = without_blank_answers(to_sample(row, fmt, reasoning=rng.choice(["train", "drop"])))
    return [] if "text" in sample else [sample["messages"]]


def mutated(rng: random.Random, value):
    """The value with one place in it replaced, removed or added to."""
    value = json.loads(json.dumps(value))
    holder, key = None, None
    node = value
    for _ in range(rng.randint(0, 4)):  # walk down to a random place
        if isinstance(node, dict) and node:
            holder, key = node, rng.choice(list(node))
        elif isinstance(node, list) and node:
            holder, key = node, rng.randrange(len(node))
        else:
            break
        node = holder[key]
    action = rng.random()
    if holder is None:
        return value if action < 0.5 else hostile(rng)
    if action < 0.5:
        holder[key] = hostile(rng)
    elif action < 0.7 and isinstance(holder, dict):
        del holder[key]
    elif isinstance(holder, dict):
        holder[rng.choice(KEYS)] = hostile(rng)
    else:
        holder.insert(key, hostile(rng))
    return value


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_any_row_is_read_into_a_well_formed_sample_or_refused_with_a_config_error(fmt):
    rng = random.Random(fmt)
    read = 0
    for i in range(600):
        value = mutated(rng, VALID[fmt]) if i % 4 else hostile(rng)
        try:
            conversations = _read(value, fmt, rng)
        except ConfigError as exc:
            assert str(exc).startswith(("d.jsonl:", "data.format")) and "\n" not in str(exc)
            continue
        read += 1
        for messages in conversations:
            _well_formed(messages)
    assert read > 100  # the mutations leave many rows readable: both outcomes are exercised


def test_random_pairs_score_exactly_their_answers(tmp_path, tokenizer):
    from snugtune.config import DataConfig
    from snugtune.data.prepare import prepare_data
    rng = random.Random(11)
    words = ["", " ", "a", "b c", "Hello.", "\n", "<|im_end|>", "é"]
    rows = [{"prompt": rng.choice(words), "chosen": rng.choice(words), "rejected": rng.choice(words)}
            for _ in range(60)]
    config = DataConfig(path=str(write_jsonl(tmp_path / "d.jsonl", rows)), eval_fraction=0.0, skip_bad_rows=True)
    for pair in prepare_data(config, tokenizer, 64, 0, objective="dpo").train:
        for ids, labels in ((pair.chosen_ids, pair.chosen_labels), (pair.rejected_ids, pair.rejected_labels)):
            scored = tokenizer.decode([t for t, label in zip(ids, labels) if label != -100])
            assert scored.endswith("<|im_end|>\n") and "<|im_start|>" not in scored


def test_random_conversations_train_exactly_their_trained_answers(tmp_path, tokenizer):
    rng = random.Random(7)
    rows = []
    for _ in range(40):
        messages = [{"role": rng.choice(["user", "assistant", "assistant", "system"]),
                     "content": rng.choice(["", " ", f"w{rng.randint(0, 999)}", f"x{rng.randint(0, 9)} y"]),
                     **({"weight": rng.choice([0, 1])} if rng.random() < 0.3 else {})}
                    for _ in range(rng.randint(1, 6))]
        rows.append({"messages": messages})
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    data = prepare(tokenizer, path, 512, skip_bad_rows=True)
    for sample in data.train:
        trained = trained_text(sample, tokenizer)
        assert trained.endswith("<|im_end|>\n") and "<|im_start|>" not in trained
    kept = [without_blank_answers(to_sample(Row("r", r), "messages"))[0] for r in rows]
    answers = sum(1 for s in kept for m in s["messages"] if turns.trained(m))
    assert sum(trained_text(s, tokenizer).count("<|im_end|>") for s in data.train) == answers


def _csv_text(rng: random.Random, separator: str, columns: int) -> tuple[str, list[dict]]:
    header = [f"col{c}" for c in range(columns)]
    pieces = ["plain", "a,b", "c;d", "e\tf", "g|h", 'say "hi"', "two\nlines", "", "é"]
    rows = [{h: rng.choice(pieces) + str(rng.randint(0, 9)) for h in header} for _ in range(rng.randint(1, 8))]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=header, delimiter=separator, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue(), rows


def test_csv_files_of_any_common_separator_read_back_the_rows_written(tmp_path):
    from snugtune.data.files import read_file
    from snugtune.data.rows import Skipped
    rng = random.Random(3)
    for i in range(120):
        separator, columns = rng.choice(CSV_SEPARATORS), rng.randint(1, 4)
        text, rows = _csv_text(rng, separator, columns)
        path = tmp_path / f"d{i}.csv"
        path.write_text(text, encoding="utf-8")
        if columns > 1:
            assert sniff_separator(text) == separator, text
        assert [r.value for r in read_file(path, Skipped(), False, "train", [])] == rows, text


def test_lines_around_the_row_limit_are_read_or_refused_by_their_line(tmp_path, monkeypatch):
    from snugtune.data import files
    from snugtune.data.rows import Skipped
    monkeypatch.setattr(files, "MAX_ROW_BYTES", 200)
    rng = random.Random(5)
    lines = [json.dumps({"text": "x" * rng.randint(150, 250)}) for _ in range(60)]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + rng.choice(["", "\n"]))
    skipped = Skipped()
    read = list(files.read_file(path, skipped, True, "train", []))
    fits = [n for n, line in enumerate(lines, start=1) if len(line.encode()) <= 200]  # the newline aside
    assert [r.where.rsplit(":", 1)[1] for r in read] == [str(n) for n in fits]
    assert skipped.reasons.get("line too long", 0) == len(lines) - len(fits)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_mutated_rows_train_or_are_counted_as_malformed_never_a_crash(tmp_path, tokenizer, fmt):
    import copy
    from test_templates import TOOL_TEMPLATE  # a template that renders tools, so that tool rows get as far as tokens
    rng = random.Random("tokens " + fmt)
    from snugtune.config import DataConfig
    from snugtune.data.prepare import prepare_data
    rows = [mutated(rng, VALID[fmt]) for _ in range(80)]
    objective = {PAIRS: "dpo", LABELLED: "kto"}.get(FORMATS[fmt].produces, "sft")
    config = DataConfig(path=str(write_jsonl(tmp_path / "d.jsonl", rows)), eval_fraction=0.0, format=fmt,
                        skip_bad_rows=True, chat_template=TOOL_TEMPLATE)
    data = prepare_data(config, copy.deepcopy(tokenizer), 128, 0, objective=objective)
    assert data.report.kept + sum(data.report.dropped.values()) == len(rows) and data.report.kept > 10
    assert all(s.trained_tokens > 0 and s.length <= (256 if objective == "dpo" else 128) for s in data.train)
