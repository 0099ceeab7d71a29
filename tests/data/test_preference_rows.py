"""data/preference_rows.py: every preference layout people have, read from files, as one pair or KTO row."""

import csv
import json

import pytest

from conftest import write_jsonl
from snugtune.config import DataConfig
from snugtune.data.rows import Row
from snugtune.data.sources import locate, read_source
from snugtune.data.detect import detect_format
from snugtune.data.format_registry import FORMATS, fields_read
from snugtune.data.preference_rows import (LABELLED, PAIRS, LabelledCompletion, PreferencePair, check_objective,
                                           to_labelled, to_pair, unpair, with_system_prompt)
from snugtune.errors import ConfigError


def U(text):  # noqa: N802 - one letter per role keeps the tables readable
    return {"role": "user", "content": text}


def A(text):  # noqa: N802
    return {"role": "assistant", "content": text}


def S(text):  # noqa: N802
    return {"role": "system", "content": text}


HH = "\n\nHuman: {q}\n\nAssistant: {a}"
PAIR_LAYOUTS = [  # (who writes it, row, (prompt, chosen, rejected))
    ("TRL text", {"prompt": "Q", "chosen": "good", "rejected": "bad"}, ([U("Q")], [A("good")], [A("bad")])),
    ("TRL conversational", {"prompt": [U("Q")], "chosen": [A("good")], "rejected": [A("bad")]},
     ([U("Q")], [A("good")], [A("bad")])),
    ("TRL implicit prompt", {"chosen": [S("S"), U("Q"), A("good")], "rejected": [S("S"), U("Q"), A("bad")]},
     ([S("S"), U("Q")], [A("good")], [A("bad")])),
    ("implicit, several turns", {"chosen": [U("q1"), A("a1"), U("q2"), A("good")],
                                 "rejected": [U("q1"), A("a1"), U("q2"), A("bad")]},
     ([U("q1"), A("a1"), U("q2")], [A("good")], [A("bad")])),
    ("Anthropic HH-RLHF", {"chosen": HH.format(q="Q", a="good"), "rejected": HH.format(q="Q", a="bad")},
     ([U("Q")], [A("good")], [A("bad")])),
    ("HH-RLHF, several turns", {"chosen": HH.format(q="q1", a="a1") + HH.format(q="q2", a="I can."),
                                "rejected": HH.format(q="q1", a="a1") + HH.format(q="q2", a="I cannot.")},
     ([U("q1"), A("a1"), U("q2")], [A("I can.")], [A("I cannot.")])),
    ("HH-RLHF prompt column", {"prompt": "\n\nHuman: Q\n\nAssistant:", "chosen": " good", "rejected": " bad"},
     ([U("Q")], [A(" good")], [A(" bad")])),
    ("text implicit prompt", {"chosen": "The sky is blue.", "rejected": "The sky is bluish green."},
     ([U("The sky is")], [A("blue.")], [A("bluish green.")])),
    ("text implicit prompt, one answer's text a prefix of the other's", {"chosen": "The sum is 10",
                                                                         "rejected": "The sum is 100"},
     ([U("The sum is")], [A("10")], [A("100")])),
    ("UltraFeedback binarized", {"prompt": "Q", "prompt_id": "7f", "chosen": [U("Q"), A("good")],
                                 "rejected": [U("Q"), A("bad")], "score_chosen": 8.0, "score_rejected": 3.0},
     ([U("Q")], [A("good")], [A("bad")])),
    ("UltraFeedback binarized, its messages column", {  # `messages` repeats the chosen conversation whole
        "prompt": "Q", "chosen": [U("Q"), A("good")], "rejected": [U("Q"), A("bad")], "messages": [U("Q"), A("good")]},
     ([U("Q")], [A("good")], [A("bad")])),
    ("LLaMA-Factory alpaca ranking", {"instruction": "I", "input": "X", "chosen": "good", "rejected": "bad",
                                      "system": "S", "history": [["hq", "ha"]]},
     ([S("S"), U("hq"), A("ha"), U("I\n\nX")], [A("good")], [A("bad")])),
    ("LLaMA-Factory sharegpt ranking", {"conversations": [{"from": "human", "value": "Q"}],
                                        "chosen": {"from": "gpt", "value": "good"},
                                        "rejected": {"from": "gpt", "value": "bad"}},
     ([U("Q")], [A("good")], [A("bad")])),
    ("Axolotl chatml.intel", {"system": "S", "question": "Q", "chosen": "good", "rejected": "bad"},
     ([S("S"), U("Q")], [A("good")], [A("bad")])),
    ("Axolotl chatml.icr", {"system": "", "input": "Q", "chosen": "good", "rejected": "bad"},
     ([U("Q")], [A("good")], [A("bad")])),
    ("Axolotl chatml.argilla", {"instruction": "Q", "chosen_response": "good", "rejected_response": "bad"},
     ([U("Q")], [A("good")], [A("bad")])),
    ("Axolotl chat_template.default", {"messages": [U("Q")], "chosen": A("good"), "rejected": A("bad")},
     ([U("Q")], [A("good")], [A("bad")])),
    ("answers with a tool call", {"prompt": [U("Q")], "chosen": [
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "content": "4"}, A("It is 4.")], "rejected": "bad"},
     ([U("Q")], [{"role": "assistant", "content": "", "tool_calls": [
         {"type": "function", "function": {"name": "f", "arguments": {}}}]}, {"role": "tool", "content": "4"},
         A("It is 4.")], [A("bad")])),
]


@pytest.mark.parametrize("layout, row, expected", PAIR_LAYOUTS, ids=[c[0] for c in PAIR_LAYOUTS])
def test_each_pair_layout_read_from_a_file_gives_its_prompt_and_answers(tmp_path, layout, row, expected):
    path = write_jsonl(tmp_path / "pairs.jsonl", [row, row])
    rows = _rows_of(path)
    assert FORMATS[detect_format(rows).name].produces == PAIRS
    pair = to_pair(rows[1])
    assert (pair.prompt, pair.chosen, pair.rejected) == expected


def test_every_column_a_layout_uses_is_counted_as_read():
    # what the format registry reports as unused columns: here only UltraFeedback's ids and scores
    from snugtune.data.rows import plain_keys
    unused = {key for _, row, _ in PAIR_LAYOUTS + KTO_LAYOUTS
              for key in plain_keys(row) if key not in fields_read(detect_format([Row("f:1", row)]).name)}
    assert unused == {"prompt_id", "score_chosen", "score_rejected"}


def test_tools_are_kept_and_the_config_system_prompt_fills_in_where_the_row_has_none():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    pair = to_pair(Row("f:1", {"prompt": "Q", "chosen": "a", "rejected": "b", "tools": json.dumps(tools)}), "Be brief.")
    assert pair.tools == tools and pair.prompt == [S("Be brief."), U("Q")]
    own = to_pair(Row("f:2", {"prompt": "Q", "chosen": "a", "rejected": "b", "system": "Mine."}), "Be brief.")
    assert own.prompt == [S("Mine."), U("Q")]
    assert with_system_prompt(to_pair(Row("f:1", {"prompt": "Q", "chosen": "a", "rejected": "b"})), "Be brief.") == \
        to_pair(Row("f:1", {"prompt": "Q", "chosen": "a", "rejected": "b"}), "Be brief.")
    assert with_system_prompt(own, "Be brief.") == own


KTO_LAYOUTS = [  # (who writes it, row, (prompt, completion, desirable))
    ("TRL text", {"prompt": "Q", "completion": "good", "label": True}, ([U("Q")], [A("good")], True)),
    ("TRL conversational", {"prompt": [U("Q")], "completion": [A("bad")], "label": False},
     ([U("Q")], [A("bad")], False)),
    ("LLaMA-Factory alpaca", {"instruction": "I", "input": "", "output": "O", "kto_tag": True},
     ([U("I")], [A("O")], True)),
    ("LLaMA-Factory sharegpt", {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "O"}],
                                "kto_tag": False}, ([U("Q")], [A("O")], False)),
    ("messages, several turns", {"messages": [U("q1"), A("a1"), U("q2"), A("a2")], "label": True},
     ([U("q1"), A("a1"), U("q2")], [A("a2")], True)),
]


@pytest.mark.parametrize("layout, row, expected", KTO_LAYOUTS, ids=[c[0] for c in KTO_LAYOUTS])
def test_each_kto_layout_read_from_a_file_gives_its_prompt_completion_and_label(tmp_path, layout, row, expected):
    path = tmp_path / "kto.json"
    path.write_text(json.dumps([row]), encoding="utf-8")
    rows = _rows_of(path)
    assert FORMATS[detect_format(rows).name].produces == LABELLED
    labelled = to_labelled(rows[0])
    assert (labelled.prompt, labelled.completion, labelled.desirable) == expected


def test_kto_labels_written_as_csv_text(tmp_path):
    path = tmp_path / "kto.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["prompt", "completion", "label"])
        writer.writerows([["Q", "a", "True"], ["Q", "b", "false"], ["Q", "c", "1"], ["Q", "d", " NO "]])
    rows = _rows_of(path)
    assert [to_labelled(r).desirable for r in rows] == [True, False, True, False]


BAD_ROWS = [  # (row, what the one-line error says), for pairs (to_pair) and KTO rows (to_labelled)
    (to_pair, ["not", "a", "dict"], "expected an object with fields, got list"),
    (to_pair, {"prompt": "Q", "chosen": "a"}, "needs 'chosen' and 'rejected' answers"),
    (to_pair, {"prompt": "Q", "chosen": 5, "rejected": "b"}, "field 'chosen' should be text, a message or a list"),
    (to_pair, {"chosen": [U("Q"), A("a")], "rejected": [U("Q"), A("a")]}, "'chosen' and 'rejected' are the same"),
    (to_pair, {"prompt": "Q", "chosen": "a", "rejected": "a"}, "'chosen' and 'rejected' are the same"),
    (to_pair, {"chosen": [U("Q"), A("a")], "rejected": [U("Q")]}, "one holds the other whole"),
    (to_pair, {"chosen": [U("Q1"), A("a")], "rejected": [U("Q2"), A("b")]}, "share no first turns"),
    (to_pair, {"chosen": [U("Q"), A("a"), U("x"), A("b")], "rejected": [U("Q"), A("a"), U("y"), A("b")]},
     "differ from turn 3 on, a 'user' turn"),
    (to_pair, {"prompt": "Q", "chosen": [U("Other"), A("a")], "rejected": [U("Other"), A("b")]},
     "the prompt column differs from the turns"),
    (to_pair, {"chosen": "same answer", "rejected": "same answer"}, "'chosen' and 'rejected' are the same"),
    (to_pair, {"chosen": "\n\nHuman: Q\n\nAssistant: A", "rejected": "\n\nHuman: Q \n\nAssistant: A\n"},
     "'chosen' and 'rejected' are the same conversation"),
    (to_pair, {"chosen": "abc", "rejected": "xyz"}, "share no prompt followed by two answers"),
    (to_pair, {"chosen": '[{"role": "user", "content": "Q"}, {"role": "assistant", "content": "a"}]',
               "rejected": '[{"role": "user", "content": "Q"}, {"role": "assistant", "content": "b"}]'},
     "'chosen' is a list of turns written as text"),
    (to_pair, {"chosen": "[{'from': 'human', 'value': 'Q'}, {'from': 'gpt', 'value': 'a'}]",
               "rejected": "[{'from': 'human', 'value': 'Q'}, {'from': 'gpt', 'value': 'b'}]"},
     "save the file as JSONL, JSON or parquet"),
    (to_pair, {"chosen": "Two words", "rejected": "Twofold"}, "share no prompt followed by two answers"),
    (to_pair, {"prompt": [A("x")], "chosen": "a", "rejected": "b"}, "should end with the turn answered"),
    (to_pair, {"prompt": [], "chosen": "a", "rejected": "b"}, "'prompt' should be a non-empty list of turns"),
    (to_pair, {"prompt": "Q", "chosen": [A("a"), U("more?")], "rejected": "b"}, "holds a 'user' turn"),
    (to_pair, {"prompt": "Q", "chosen": [A("a"), {"role": "tool", "content": "1"}], "rejected": "b"},
     "holds a 'tool' turn at its end"),
    (to_pair, {"prompt": "Q", "chosen": "a", "rejected": "b", "images": ["x.png"]}, "multimodal data"),
    (to_pair, {"prompt": "Q", "chosen": "a", "rejected": "b", "system": 3}, "field 'system' should be text"),
    (to_pair, {"prompt": "Q", "chosen": {"speaker": "gpt"}, "rejected": "b"}, "needs 'role' and 'content'"),
    (to_labelled, {"prompt": "Q", "completion": "a", "label": "maybe"}, "field 'label' should be true or false"),
    (to_labelled, {"prompt": "Q", "completion": "a", "label": 2}, "field 'label' should be true or false, got 2"),
    (to_labelled, {"prompt": "Q", "completion": "a", "kto_tag": 1.0}, "field 'kto_tag' should be true or false"),
    (to_labelled, {"prompt": "Q", "completion": "a"}, "needs a true/false 'label'"),
    (to_labelled, {"completion": "a", "label": True}, "needs a prompt"),
    (to_labelled, {"messages": [U("Q")], "label": True}, "should end with the assistant's answer"),
    (to_labelled, {"prompt": "Q", "completion": [U("x"), A("y")], "label": True}, "should be the answer"),
    (to_labelled, {"label": True, "text": "t"}, "needs a 'completion'"),
]


@pytest.mark.parametrize("normalise, value, message", BAD_ROWS)
def test_bad_rows_are_refused_in_one_line_naming_the_row(normalise, value, message):
    with pytest.raises(ConfigError) as caught:
        normalise(Row("data.jsonl:7", value))
    text = str(caught.value)
    assert text.startswith("data.jsonl:7: ") and message in text and "\n" not in text


def test_kinds_are_detected_mixed_files_refused_and_each_objective_takes_its_kind(tmp_path):
    pairs = [Row("f:1", {"prompt": "Q", "chosen": "a", "rejected": "b"})]
    labelled = [Row("f:1", {"prompt": "Q", "completion": "a", "label": False})]
    sft = [Row("f:1", {"instruction": "Q", "output": "a"})]
    assert [detect_format(rows).name for rows in (pairs, labelled, sft)] == ["preference", "kto", "alpaca"]
    with pytest.raises(ConfigError, match=r"several formats \(kto, preference\)"):
        detect_format(pairs + [Row("f:2", labelled[0].value)])
    allowed = {("pairs", "dpo"), ("pairs", "orpo"), ("pairs", "kto"), ("labelled", "kto"), ("sft", "sft")}
    for kind in ("pairs", "labelled", "sft"):
        for objective in ("sft", "dpo", "orpo", "kto"):
            if (kind, objective) in allowed:
                check_objective(kind, objective, "d.jsonl")
            else:
                with pytest.raises(ConfigError, match=f"d.jsonl: holds .* but objective: {objective} trains on"):
                    check_objective(kind, objective, "d.jsonl")


def test_a_pair_unpairs_into_a_desirable_and_an_undesirable_kto_row():
    pair = PreferencePair([U("Q")], [A("good")], [A("bad")])
    assert unpair(pair) == (LabelledCompletion([U("Q")], [A("good")], True),
                            LabelledCompletion([U("Q")], [A("bad")], False))


def _rows_of(path) -> list[Row]:
    data = DataConfig(path=str(path))
    return read_source(locate(data), data)[0]
