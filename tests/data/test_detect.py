import pytest

from conftest import prepare, write_jsonl
from snugtune.errors import ConfigError
from snugtune.data.detect import detect_format
from snugtune.data.rows import Row


def test_format_detection_reports_its_choice():
    rows = [Row("f:1", {"instruction": "a", "input": "", "output": "b"})]
    assert detect_format(rows).name == "alpaca"
    assert detect_format([Row("f:1", {"messages": []})]).name == "messages"
    assert detect_format([Row("f:1", {"text": "### Human: hi ### Assistant: yo"})]).name == "guanaco"
    choice = detect_format([Row("f:1", {"problem": "1+1", "solution": "2"})])
    assert choice.name == "prompt-completion" and choice.reason == "rows have 'problem' and 'solution'"


def test_cannot_tell_the_format_lists_the_keys_it_saw():
    rows = [Row("d.jsonl:1", {"query": "a", "reply": "b"}), Row("d.jsonl:2", {"query": "c", "score": 1})]
    with pytest.raises(ConfigError, match=r"d.jsonl: cannot tell the data format .*\(query, reply, score\); "
                                          r"set data.format .* data.columns"):
        detect_format(rows)


def test_rows_of_two_formats_ask_for_data_format():
    with pytest.raises(ConfigError, match=r"several formats \(alpaca, messages\); set data.format"):
        detect_format([Row("f:1", {"instruction": "a", "output": "b"}), Row("f:2", {"messages": []})])


KTO_ROW = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away"}], "label": False}
PAIR_ROW = {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}
# The shapes of LLaMA-Factory's dpo_en_demo / kto_en_demo / mllm_demo and TRL's preference and multimodal rows:
# (row, data.format, the one-line error). Preference data is read as such, and objective: sft refuses it.
REFUSED = {
    "preference (TRL)": (PAIR_ROW, "auto", r"d.jsonl: holds preference pairs \(chosen/rejected\), but objective: sft "
                                           r"trains on .*; set objective to one of dpo, orpo, kto"),
    "preference (LLaMA-Factory sharegpt)": (
        {"conversations": [{"from": "human", "value": "Hi"}], "chosen": {"from": "gpt", "value": "Hello"},
         "rejected": {"from": "gpt", "value": "Go away"}}, "auto",
        r"d.jsonl: holds preference pairs \(chosen/rejected\), but objective: sft"),
    "KTO": (KTO_ROW, "auto", r"d.jsonl: holds labelled completions \(KTO\), but objective: sft .*; set objective to "
                             r"one of kto"),
    "pairs read as prompt-completion": (PAIR_ROW, "prompt-completion",
                                        r"d.jsonl:1: preference pairs \(chosen/rejected\), which the other"),
    "KTO read as messages": (KTO_ROW, "messages", r"d.jsonl:1: labelled completions \(KTO: rows with a true/false "
                                                  r"'label'\)"),
    "multimodal": ({"messages": [{"role": "user", "content": "<image>Who are they?"},
                                 {"role": "assistant", "content": "They are players."}],
                    "images": ["mllm_demo_data/1.jpg"]}, "auto", r"d.jsonl:1: multimodal data \(a 'images' column\)"),
    "multimodal parts (TRL)": ({"messages": [{"role": "user", "content": [{"type": "image"},
                                                                        {"type": "text", "text": "Color?"}]},
                                             {"role": "assistant", "content": [{"type": "text", "text": "Blue."}]}]},
                               "auto", r"d.jsonl:1: messages\[0\].content\[0\] is an image part: multimodal data"),
}


@pytest.mark.parametrize("kind", list(REFUSED))
def test_preference_kto_and_multimodal_data_are_refused_under_sft_naming_the_kind(tmp_path, tokenizer, kind):
    row, fmt, message = REFUSED[kind]
    path = write_jsonl(tmp_path / "d.jsonl", [row])
    with pytest.raises(ConfigError, match=message):
        prepare(tokenizer, path, format=fmt)
