"""The format registry is the one list of formats: every entry complete, and the config, detection, column
mapping and docs all follow it."""

import typing

import pytest

from conftest import REPO_ROOT
from snugtune.config import DATA_FIELDS, DataConfig
from snugtune.data.detect import detect_format
from snugtune.data.format_registry import CONVERSATION, DOCUMENT, FORMATS, column_fields, fields_read
from snugtune.data.normalize import to_sample
from snugtune.data.preference_rows import LABELLED, PAIRS, LabelledCompletion, PreferencePair
from snugtune.data.rows import Row, plain_keys
from snugtune.errors import ConfigError

# One row of each format: a format added to the registry needs one here
EXAMPLES = {
    "preference": {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
    "preference-implicit": {"chosen": [{"role": "user", "content": "Sky?"}, {"role": "assistant", "content": "Blue."}],
                            "rejected": [{"role": "user", "content": "Sky?"}, {"role": "assistant", "content": "Green."}]},
    "kto": {"prompt": "The sky is", "completion": " green.", "label": False},
    "alpaca": {"instruction": "Add 2 and 3.", "input": "", "output": "5"},
    "messages": {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]},
    "sharegpt": {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
    "prompt-completion": {"prompt": "The sky is", "completion": " blue."},
    "guanaco": {"text": "### Human: Hi### Assistant: Hello."},
    "text": {"text": "Call me Ishmael."},
}


def test_every_format_has_an_example_a_detector_a_reader_fields_and_a_doc_line():
    assert list(EXAMPLES) == list(FORMATS)
    for name, entry in FORMATS.items():
        assert callable(entry.detect) and callable(entry.read), name
        assert entry.fields and set(entry.turn_lists) <= set(entry.fields), name
        assert entry.doc.strip() and "\n" not in entry.doc, name
        assert entry.produces in (CONVERSATION, DOCUMENT, PAIRS, LABELLED), name
        assert set(entry.gives_way_to) <= set(FORMATS), name


READ_AS = {PAIRS: PreferencePair, LABELLED: LabelledCompletion}


@pytest.mark.parametrize("name", list(FORMATS))
def test_each_format_is_detected_from_its_example_and_read_into_a_sample(name):
    row = Row("d.jsonl:1", EXAMPLES[name])
    assert detect_format([row]).name == name
    produces = FORMATS[name].produces
    if produces in READ_AS:  # preference rows are read into pairs or labelled completions, not samples
        assert isinstance(FORMATS[name].read(row, plain_keys(row.value)), READ_AS[produces])
    else:
        assert ("text" in to_sample(row, name)) == (produces == DOCUMENT)
    assert set(EXAMPLES[name]) <= fields_read(name)  # nothing of the example is reported unused


def test_the_config_accepts_exactly_the_registry_formats_and_maps_columns_onto_their_fields():
    assert typing.get_args(DataConfig.model_fields["format"].annotation) == ("auto", *FORMATS)
    for name in FORMATS:
        assert DataConfig(path="d.jsonl", format=name).format == name
    with pytest.raises(ValueError):
        DataConfig(path="d.jsonl", format="csv")
    assert DATA_FIELDS == column_fields()
    assert {f for entry in FORMATS.values() for f in entry.fields} | {"role", "content"} == set(DATA_FIELDS)


def test_docs_list_every_format_of_the_registry():
    docs = (REPO_ROOT / "docs" / "data.md").read_text()
    registry = docs.split("### The format registry")[1].split("\n## ")[0]
    for name, entry in FORMATS.items():
        assert f"| `{name}` | {entry.doc} |" in registry, name


def test_a_format_outside_the_registry_is_refused_by_name():
    with pytest.raises(ConfigError, match="data.format: unknown format 'csv'"):
        to_sample(Row("d.jsonl:1", {"text": "x"}), "csv")


KTO_LAYOUTS_WITHOUT_A_LABEL = [  # a KTO file's row whose label is missing, null or blank, in each KTO layout
    {"prompt": "Q", "completion": "a", "label": None},
    {"prompt": "Q", "completion": "a", "label": ""},  # an empty CSV cell
    {"prompt": "Q", "completion": "a"},
    {"instruction": "Q", "output": "a", "kto_tag": None},
    {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "a"}], "label": None},
    {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "a"}], "kto_tag": None},
]


@pytest.mark.parametrize("unlabelled", KTO_LAYOUTS_WITHOUT_A_LABEL)
def test_a_kto_row_without_a_label_is_named_not_taken_for_another_format(unlabelled):
    labelled = {**unlabelled, "kto_tag" if "kto_tag" in unlabelled else "label": True}
    rows = [Row("d.jsonl:1", labelled), Row("d.jsonl:2", unlabelled)]
    assert detect_format(rows).name == "kto"
    with pytest.raises(ConfigError, match=r"^d.jsonl:2: .*'(label|kto_tag)'"):
        FORMATS["kto"].read(rows[1], plain_keys(rows[1].value))
