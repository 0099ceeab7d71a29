import json

import pytest

from conftest import alpaca_rows, write_jsonl
from snugtune.config import DataConfig
from snugtune.errors import ConfigError
from snugtune.data import collate, prepare_data
from snugtune.data.formats import Row, detect_format
from snugtune.data.tokenize import IGNORE, tokenize_sample
from snugtune.models import load_tokenizer, resolve_model


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model("shape:tiny").path)


def trained_text(sample, tokenizer) -> str:
    return tokenizer.decode([t for t, lab in zip(sample.input_ids, sample.labels) if lab != IGNORE])


def test_alpaca_trains_on_the_answer_and_eos_only(tokenizer):
    sample = {"messages": [{"role": "user", "content": "Add 2 and 3."},
                           {"role": "assistant", "content": "The sum is 5."}]}
    tok = tokenize_sample(sample, tokenizer, "row")
    assert trained_text(tok, tokenizer) == "The sum is 5.<|im_end|>\n"
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.eos_token_id in [t for t, lab in zip(tok.input_ids, tok.labels) if lab != IGNORE]
    # the prompt rendered for inference is exactly the untrained prefix
    prompt = tokenizer.apply_chat_template(sample["messages"][:1], tokenize=False, add_generation_prompt=True)
    first_trained = next(i for i, lab in enumerate(tok.labels) if lab != IGNORE)
    assert tokenizer.decode(tok.input_ids[:first_trained]) == prompt


def test_multi_turn_trains_every_assistant_turn_and_nothing_else(tokenizer):
    sample = {"messages": [{"role": "system", "content": "Be brief."},
                           {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                           {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye!"}]}
    tok = tokenize_sample(sample, tokenizer, "row")
    assert trained_text(tok, tokenizer) == "Hello!<|im_end|>\nGoodbye!<|im_end|>\n"
    everything = tokenize_sample(sample, tokenizer, "row", train_on_prompt=True)
    assert everything.input_ids == tok.input_ids
    assert all(lab != IGNORE for lab in everything.labels)


def test_format_detection_reports_its_choice(tmp_path):
    rows = [Row("f:1", {"instruction": "a", "input": "", "output": "b"})]
    assert detect_format(rows).name == "alpaca"
    assert detect_format([Row("f:1", {"messages": []})]).name == "messages"
    assert detect_format([Row("f:1", {"text": "### Human: hi ### Assistant: yo"})]).name == "guanaco"
    assert detect_format([Row("f:1", {"problem": "1+1", "solution": "2"})]).name == "prompt-completion"
    with pytest.raises(ConfigError, match="set data.format"):
        detect_format([Row("f:1", {"foo": 1})])


def test_invalid_json_names_file_and_line(tmp_path, tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(alpaca_rows(1)[0]) + "\n{not json\n")
    with pytest.raises(ConfigError, match=r"bad.jsonl:2: invalid JSON"):
        prepare_data(DataConfig(path=str(path)), tokenizer, 128, 0)
    report = prepare_data(DataConfig(path=str(path), skip_bad_rows=True, eval_fraction=0.0), tokenizer, 128, 0).report
    assert report.dropped == {"invalid JSON": 1} and report.kept == 1


def test_missing_field_names_the_row(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "c", "outptu": "d"}])
    with pytest.raises(ConfigError, match=r"d.jsonl:2: missing field 'output'"):
        prepare_data(DataConfig(path=str(path), format="alpaca"), tokenizer, 128, 0)


def test_long_samples_are_truncated_or_dropped_and_counted(tmp_path, tokenizer):
    rows = alpaca_rows(10) + [{"instruction": "x " * 300, "input": "", "output": "y"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    dropped = prepare_data(DataConfig(path=str(path), too_long="drop", eval_fraction=0.0), tokenizer, 64, 0).report
    assert dropped.kept == 10 and dropped.dropped == {"longer than max_seq_len=64": 1}
    # truncation that cuts off the whole answer leaves nothing to train: dropped too, never trained on
    cut = prepare_data(DataConfig(path=str(path), eval_fraction=0.0), tokenizer, 64, 0).report
    assert cut.kept == 10 and sum(cut.dropped.values()) == 1


def test_collate_masks_padding_out_of_loss_and_attention(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(4))
    data = prepare_data(DataConfig(path=str(path), eval_fraction=0.0), tokenizer, 128, 0)
    batch = collate(data.train, tokenizer.pad_token_id)
    for i, sample in enumerate(data.train):
        n = len(sample.input_ids)
        assert batch["attention_mask"][i, :n].all() and not batch["attention_mask"][i, n:].any()
        assert (batch["labels"][i, n:] == IGNORE).all()


# --- every format, from every file type ---------------------------------------------------------------

def _prepare(tokenizer, path, **data):
    return prepare_data(DataConfig(path=str(path), eval_fraction=0.0, **data), tokenizer, 256, 0)


def test_sharegpt_guanaco_and_prompt_completion_train_only_the_answers(tmp_path, tokenizer):
    cases = {
        "sharegpt": {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q1"},
                                       {"from": "gpt", "value": "A1"}, {"from": "human", "value": "Q2"},
                                       {"from": "gpt", "value": "A2"}]},
        "guanaco": {"text": "### Human: Q1### Assistant: A1### Human: Q2### Assistant: A2"},
        "prompt-completion": {"prompt": "Q1", "completion": "A1"},
    }
    for fmt, row in cases.items():
        data = _prepare(tokenizer, write_jsonl(tmp_path / f"{fmt}.jsonl", [row]))
        assert data.report.format == fmt
        expected = "A1<|im_end|>\n" + ("A2<|im_end|>\n" if fmt != "prompt-completion" else "")
        assert trained_text(data.train[0], tokenizer) == expected, fmt


def test_chatdoctor_capitalised_alpaca_keys(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "cd.jsonl", [{"### Instruction": "I", "### Input": "In", "### Output": "Out"}])
    data = _prepare(tokenizer, path)
    assert data.report.format == "alpaca" and trained_text(data.train[0], tokenizer) == "Out<|im_end|>\n"


def test_text_rows_and_source_folders_train_every_token_and_end_with_eos(tmp_path, tokenizer):
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "a.py").write_text("def a():\n    return 1\n")
    (folder / "b.py").write_text("def b():\n    return 2\n")
    data = _prepare(tokenizer, folder, format="text")
    assert data.report.kept == 2
    for sample in data.train:
        assert all(lab != IGNORE for lab in sample.labels) and sample.input_ids[-1] == tokenizer.eos_token_id
    texts = _prepare(tokenizer, write_jsonl(tmp_path / "t.jsonl", [{"text": "hello world"}]))
    assert texts.report.format == "text"


def test_json_csv_parquet_and_saved_datasets_read_the_same_rows(tmp_path, tokenizer):
    import csv

    import datasets
    rows = alpaca_rows(6)
    (tmp_path / "d.json").write_text(json.dumps(rows))
    with (tmp_path / "d.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["instruction", "input", "output"])
        writer.writeheader()
        writer.writerows(rows)
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "saved"))
    reference = sorted(s.input_ids for s in _prepare(tokenizer, write_jsonl(tmp_path / "d.jsonl", rows)).train)
    for name in ["d.json", "d.csv", "d.parquet", "saved"]:
        assert sorted(s.input_ids for s in _prepare(tokenizer, tmp_path / name).train) == reference, name


def test_eos_is_trained_even_though_pad_equals_eos(tmp_path, tokenizer):
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # SmolLM2's setup, the classic trap
    data = _prepare(tokenizer, write_jsonl(tmp_path / "d.jsonl", alpaca_rows(3)))
    batch = collate(data.train, tokenizer.pad_token_id)
    for i, sample in enumerate(data.train):
        answer_eos = [j for j, (t, lab) in enumerate(zip(sample.input_ids, sample.labels))
                      if t == tokenizer.eos_token_id and lab != IGNORE]
        assert len(answer_eos) == 1  # the end of the answer is a target, in the batch too
        assert batch["labels"][i, answer_eos[0]] == tokenizer.eos_token_id


def test_exactly_one_bos_when_the_tokenizer_adds_one_and_the_template_does_not(tokenizer):
    import copy
    tok = copy.deepcopy(tokenizer)
    tok.bos_token = "<|endoftext|>"
    tok.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}<|im_end|>{% endfor %}" \
                        "{% if add_generation_prompt %}[assistant] {% endif %}"
    tok._tokenizer.post_processor = __import__("tokenizers").processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", tok.bos_token_id)])
    assert tok("x")["input_ids"][0] == tok.bos_token_id
    sample = tokenize_sample({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]},
                             tok, "row")
    assert sample.input_ids.count(tok.bos_token_id) == 1 and sample.input_ids[0] == tok.bos_token_id


def test_a_sample_with_nothing_to_train_is_an_error_naming_it(tokenizer):
    with pytest.raises(ConfigError, match="row 7: the conversation has no assistant turn"):
        tokenize_sample({"messages": [{"role": "user", "content": "Q"}]}, tokenizer, "row 7")


def test_blank_answers_are_dropped_and_counted(tmp_path, tokenizer):
    rows = alpaca_rows(3) + [{"instruction": "x", "input": "", "output": "   "}]
    data = _prepare(tokenizer, write_jsonl(tmp_path / "d.jsonl", rows))
    assert data.report.kept == 3 and data.report.dropped == {"empty answer": 1}


def test_tokenizer_without_template_gets_the_stated_default(tokenizer):
    import copy
    from snugtune.data.tokenize import DEFAULT_CHAT_TEMPLATE, ensure_chat_template
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    assert ensure_chat_template(tok) and tok.chat_template == DEFAULT_CHAT_TEMPLATE


@pytest.mark.parametrize("content, message", [
    (b"", "the file is empty"),
    (b'{"instruction": "a", "output": 5}\n', "d.jsonl:1: field 'output' should be text, got int"),
    (b'{"instruction": "a", "output": "\xff\xfe"}\n', "d.jsonl:1: not UTF-8"),
    (b'["just", "a", "list"]\n', "d.jsonl:1: expected an object with fields"),
])
def test_bad_input_is_named_by_file_and_line(tmp_path, tokenizer, content, message):
    path = tmp_path / "d.jsonl"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        prepare_data(DataConfig(path=str(path), format="alpaca"), tokenizer, 128, 0)


# --- packing ---------------------------------------------------------------------------------------------

def test_packing_fills_rows_without_crossing_max_seq_len(tmp_path, tokenizer):
    from snugtune.data.batches import micro_batches
    data = _prepare(tokenizer, write_jsonl(tmp_path / "d.jsonl", alpaca_rows(40)))
    packed = micro_batches(data.train, 2, 0, 0, packed_len=256)
    rows = [row for batch in packed for row in batch]
    assert all(sum(len(s.input_ids) for s in row) <= 256 for row in rows)
    assert sorted(id(s) for row in rows for s in row) == sorted(id(s) for s in data.train)  # each sample once
    assert len(rows) < len(data.train) / 3  # really packed


def test_a_samples_loss_is_the_same_packed_and_alone(tmp_path, tokenizer):
    import torch
    from snugtune.data.batches import collate_packed
    from snugtune.loss import token_loss_sum
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(resolve_model("shape:tiny").path, dtype=torch.float32).eval()
    data = _prepare(tokenizer, write_jsonl(tmp_path / "d.jsonl", alpaca_rows(6)), format="alpaca")
    with torch.no_grad():
        alone = [token_loss_sum(model, collate([s], tokenizer.pad_token_id)) for s in data.train]
        packed_sum, packed_n = token_loss_sum(model, collate_packed([data.train], tokenizer.pad_token_id))
        for i, sample in enumerate(data.train):  # each sample's own loss inside the packed row
            others = [s for s in data.train if s is not sample]
            row = collate_packed([[*others, sample]], tokenizer.pad_token_id)
            start = sum(len(s.input_ids) for s in others)
            row["labels"][:, :start] = IGNORE
            inside, n = token_loss_sum(model, row)
            assert n == alone[i][1] and float(inside) == pytest.approx(float(alone[i][0]), rel=1e-5)
    assert packed_n == sum(n for _, n in alone)
    assert float(packed_sum) == pytest.approx(sum(float(l) for l, _ in alone), rel=1e-5)


def test_gpu_rounding_of_lengths_pads_without_changing_tokens_or_loss(tmp_path, tokenizer):
    import torch
    from snugtune.data import GPU_PAD_MULTIPLE, collate_micro_batch, real_tokens
    from snugtune.loss import token_loss_sum
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(resolve_model("shape:tiny").path, dtype=torch.float32).eval()
    data = _prepare(tokenizer, write_jsonl(tmp_path / "d.jsonl", alpaca_rows(6)), format="alpaca")
    for packed, rows in ((True, [data.train[:3], data.train[3:5]]), (False, [[s] for s in data.train[:3]])):
        exact = collate_micro_batch(rows, tokenizer.pad_token_id, packed)
        rounded = collate_micro_batch(rows, tokenizer.pad_token_id, packed, GPU_PAD_MULTIPLE)
        assert exact["input_ids"].shape[1] % GPU_PAD_MULTIPLE != 0  # the rounding does something here
        assert rounded["input_ids"].shape[1] % GPU_PAD_MULTIPLE == 0
        assert real_tokens(rounded) == real_tokens(exact)
        with torch.no_grad():
            (loss, n), (loss_rounded, n_rounded) = token_loss_sum(model, exact), token_loss_sum(model, rounded)
        assert n_rounded == n and float(loss_rounded) == pytest.approx(float(loss), rel=1e-5)
        # never past max_seq_len (what the planner sized the run for), never shorter than the rows
        length = exact["input_ids"].shape[1]
        capped = collate_micro_batch(rows, tokenizer.pad_token_id, packed, GPU_PAD_MULTIPLE, max_len=length + 1)
        assert capped["input_ids"].shape[1] == length + 1
        assert collate_micro_batch(rows, tokenizer.pad_token_id, packed, GPU_PAD_MULTIPLE,
                                   max_len=length - 1)["input_ids"].shape[1] == length
    # a packed row of one sample stays one run of positions through its padding: no block-diagonal mask
    single = collate_micro_batch([data.train[:1]], tokenizer.pad_token_id, True, GPU_PAD_MULTIPLE)
    assert torch.equal(single["position_ids"][0], torch.arange(single["input_ids"].shape[1]))


def test_the_tokenized_cache_is_hit_on_the_second_run(tmp_path, tokenizer, monkeypatch):
    import snugtune.data as data_module
    path = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(8))
    config = DataConfig(path=str(path))
    first = prepare_data(config, tokenizer, 128, 0, cache_dir=tmp_path / "cache")
    assert first.report.cache == "miss"
    monkeypatch.setattr(data_module, "tokenize_sample", lambda *a, **k: pytest.fail("tokenized again"))
    second = prepare_data(config, tokenizer, 128, 0, cache_dir=tmp_path / "cache")
    assert second.report.cache == "hit"
    assert [s.input_ids for s in second.train] == [s.input_ids for s in first.train]
    # a changed file, or a changed max_seq_len, is a different key
    monkeypatch.undo()
    assert prepare_data(config, tokenizer, 64, 0, cache_dir=tmp_path / "cache").report.cache == "miss"
    write_jsonl(path, alpaca_rows(9))
    assert prepare_data(config, tokenizer, 128, 0, cache_dir=tmp_path / "cache").report.cache == "miss"


def test_data_command_marks_trained_tokens(tmp_path, alpaca_file):
    import subprocess
    import sys
    config = tmp_path / "c.yaml"
    config.write_text(f"model: shape:tiny\ndata: {{path: {alpaca_file}}}\n")
    proc = subprocess.run([sys.executable, "-m", "snugtune", "data", str(config), "--show", "1"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "format: alpaca" in proc.stdout and "[[The sum is" in proc.stdout and "<|im_end|>" in proc.stdout
