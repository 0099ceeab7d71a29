import copy
import json
import sysconfig
from pathlib import Path

import pytest

from conftest import prepare, trained_text, write_jsonl
from snugtune.config import DataConfig
from snugtune.errors import ConfigError
from snugtune.data.templates import ALPACA_TEMPLATE, CHATML_TEMPLATE, set_chat_template
from snugtune.data.tokenize import IGNORE


@pytest.fixture(scope="session")
def base_tokenizer(tmp_path_factory):
    """A Llama-2-style base tokenizer: a 32,000-piece SentencePiece-style BPE (Metaspace, <s> and </s>)
    trained here on the standard library's source, with no chat template and no ChatML tokens."""
    from tokenizers import SentencePieceBPETokenizer
    from transformers import AutoTokenizer, LlamaTokenizerFast
    sources = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:120]
    trainer = SentencePieceBPETokenizer()
    trainer.train_from_iterator((p.read_text(encoding="utf-8", errors="replace") for p in sources), vocab_size=32000,
                                special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    folder = tmp_path_factory.mktemp("llama2-like")
    LlamaTokenizerFast(tokenizer_object=trainer._tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                       add_bos_token=True).save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


@pytest.mark.slow
def test_a_base_model_without_template_gets_alpaca_text_and_eos_from_its_own_vocabulary(tmp_path, base_tokenizer):
    tok = copy.deepcopy(base_tokenizer)
    assert len(tok) == 32000 and tok.chat_template is None and "<|im_start|>" not in tok.get_vocab()
    rows = [{"instruction": "Add 2 and 3.", "input": "", "output": "The sum is 5."}]
    data = prepare(tok, write_jsonl(tmp_path / "d.jsonl", rows))
    assert data.report.chat_template.startswith("Alpaca-style") and tok.chat_template == ALPACA_TEMPLATE
    sample = data.train[0]
    assert sample.input_ids[0] == tok.bos_token_id and sample.input_ids.count(tok.bos_token_id) == 1
    assert tok.decode(sample.input_ids, skip_special_tokens=True) == \
        "### Instruction:\nAdd 2 and 3.\n\n### Response:\nThe sum is 5."
    trained = [t for t, lab in zip(sample.input_ids, sample.labels) if lab != IGNORE]
    assert trained[-1] == tok.eos_token_id and trained.count(tok.eos_token_id) == 1  # the answer ends with EOS
    assert tok.decode(trained, skip_special_tokens=True) == "The sum is 5."
    assert all(token < 32000 for token in sample.input_ids)  # nothing outside the vocabulary
    # ChatML, asked for by name, is refused: its markers would be trained as sub-word pieces
    with pytest.raises(ConfigError, match=r"<\|im_end\|>, <\|im_start\|> are not tokens of this model's vocabulary"):
        set_chat_template(copy.deepcopy(base_tokenizer), DataConfig(path="d", chat_template="chatml"))


def test_a_template_less_tokenizer_with_chatml_tokens_gets_chatml(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    assert set_chat_template(tok, DataConfig(path="d")).startswith("ChatML") and tok.chat_template == CHATML_TEMPLATE


def test_a_chat_template_override_by_name_file_or_text(tmp_path, tokenizer):
    rows = [{"instruction": "Q", "output": "A"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    alpaca = prepare(copy.deepcopy(tokenizer), path, chat_template="alpaca").train[0]
    assert tokenizer.decode(alpaca.input_ids) == "### Instruction:\nQ\n\n### Response:\nA<|im_end|>"
    (tmp_path / "mine.jinja").write_text("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                                        "{% if add_generation_prompt %}<assistant>{% endif %}")
    for template in [str(tmp_path / "mine.jinja"), (tmp_path / "mine.jinja").read_text()]:
        sample = prepare(copy.deepcopy(tokenizer), path, chat_template=template).train[0]
        assert tokenizer.decode(sample.input_ids) == "<user>Q<assistant>A<|im_end|>"
        assert trained_text(sample, tokenizer) == "A<|im_end|>"
    with pytest.raises(ConfigError, match="data.chat_template: nope.jinja is not chatml, alpaca, a template file"):
        prepare(copy.deepcopy(tokenizer), path, chat_template="nope.jinja")


# A template that renders tools, tool calls and tool results, as Qwen2.5's does
TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n<tools>{% for t in tools %}\n{{ t | tojson }}{% endfor %}\n</tools><|im_end|>\n"
    "{% endif %}{% for m in messages %}{% if m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}"
    "\n</tool_response><|im_end|>\n{% elif m.role == 'assistant' %}<|im_start|>assistant\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<tool_call>\n{\"name\": \"{{ c.function.name }}\", \"arguments\": "
    "{{ c.function.arguments | tojson }}}\n</tool_call>{% endfor %}<|im_end|>\n{% else %}<|im_start|>{{ m.role }}\n"
    "{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

WEATHER = {"type": "function", "function": {"name": "get_current_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"location": {"type": "string"}}}}}
OPENAI_ROW = {"messages": [  # OpenAI's fine-tuning format for function calling
    {"role": "user", "content": "What is the weather in San Francisco?"},
    {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function", "function": {
        "name": "get_current_weather", "arguments": "{\"location\": \"San Francisco, USA\"}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "21.0"},
    {"role": "assistant", "content": "It is 21 degrees in San Francisco."}], "tools": [WEATHER]}
SHAREGPT_ROW = {"conversations": [  # LLaMA-Factory's glaive_toolcall demo
    {"from": "human", "value": "What is the weather in San Francisco?"},
    {"from": "function_call", "value": "{\"name\": \"get_current_weather\", \"arguments\": {\"location\": \"San Francisco, USA\"}}"},
    {"from": "observation", "value": "21.0"},
    {"from": "gpt", "value": "It is 21 degrees in San Francisco."}],
    "tools": json.dumps([WEATHER["function"]])}


@pytest.mark.parametrize("row", [OPENAI_ROW, SHAREGPT_ROW], ids=["openai", "sharegpt"])
def test_tool_calls_train_through_a_template_that_renders_them(tmp_path, tokenizer, row):
    sample = prepare(copy.deepcopy(tokenizer), write_jsonl(tmp_path / "d.jsonl", [row]), chat_template=TOOL_TEMPLATE).train[0]
    call = '<tool_call>\n{"name": "get_current_weather", "arguments": {"location": "San Francisco, USA"}}\n</tool_call>'
    assert trained_text(sample, tokenizer) == f"{call}<|im_end|>\nIt is 21 degrees in San Francisco.<|im_end|>\n"
    prompt = tokenizer.decode([t for t, lab in zip(sample.input_ids, sample.labels) if lab == IGNORE])
    assert '"description": "Weather in a city"' in prompt and "<tool_response>\n21.0\n</tool_response>" in prompt


@pytest.mark.parametrize("row, field", [(OPENAI_ROW, "field 'tools'"),
                                        ({"messages": OPENAI_ROW["messages"]}, "tool calls \\('tool_calls'")],
                         ids=["tools", "tool_calls"])
def test_tool_data_is_refused_naming_the_field_when_the_template_cannot_render_it(tmp_path, tokenizer, row, field):
    with pytest.raises(ConfigError, match=f"d.jsonl:1: {field}.*the chat template does not render them"):
        prepare(copy.deepcopy(tokenizer), write_jsonl(tmp_path / "d.jsonl", [row]))
