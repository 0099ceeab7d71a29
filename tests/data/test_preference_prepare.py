"""prepare_data under the preference objectives: pairs for dpo and orpo, labelled completions for kto (pairs
unpaired, each half on the same side of the split), the objective in the cache key, drops counted."""

import copy

import pytest

from conftest import pair_rows, write_jsonl
from snugtune.config import DataConfig
from snugtune.data.prepare import prepare_data
from snugtune.data.preference_tokenize import TokenizedCompletion, TokenizedPair
from snugtune.errors import ConfigError


def _config(path, **data):
    return DataConfig(path=str(path), **{"eval_fraction": 0.25, **data})


def test_pairs_are_prepared_for_dpo_and_orpo_and_cached_per_objective(tmp_path, tokenizer, monkeypatch):
    import snugtune.data.prepare as prepare_module
    path = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(8))
    first = prepare_data(_config(path), tokenizer, 96, 0, cache_dir=tmp_path / "cache", objective="dpo")
    assert first.report.format == "preference" and first.report.cache == "miss"
    assert len(first.train) == 6 and len(first.eval) == 2 and all(isinstance(p, TokenizedPair) for p in first.train)
    assert first.report.train_tokens == sum(p.length for p in first.train)
    monkeypatch.setattr(prepare_module, "tokenize_pair", lambda *a, **k: pytest.fail("tokenized again"))
    again = prepare_data(_config(path), tokenizer, 96, 0, cache_dir=tmp_path / "cache", objective="dpo")
    assert again.report.cache == "hit" and again.train == first.train and again.eval == first.eval
    monkeypatch.undo()
    orpo = prepare_data(_config(path), tokenizer, 96, 0, cache_dir=tmp_path / "cache", objective="orpo")
    assert orpo.report.cache == "miss" and orpo.train == first.train  # the same pairs, another key
    kto = prepare_data(_config(path), tokenizer, 96, 0, cache_dir=tmp_path / "cache", objective="kto")
    cached = prepare_data(_config(path), tokenizer, 96, 0, cache_dir=tmp_path / "cache", objective="kto")
    assert cached.report.cache == "hit" and cached.train == kto.train


def test_kto_unpairs_each_pair_keeps_its_halves_on_one_side_and_pairs_prompts_with_other_answers(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(8))
    pairs = prepare_data(_config(path), tokenizer, 96, 0, objective="dpo")
    rows = prepare_data(_config(path), tokenizer, 96, 0, objective="kto")
    assert all(isinstance(r, TokenizedCompletion) for r in rows.train + rows.eval)
    for side_pairs, side_rows in ((pairs.train, rows.train), (pairs.eval, rows.eval)):
        n = len(side_pairs)
        assert [r.desirable for r in side_rows] == [True] * n + [False] * n  # TRL's unpaired order
        assert {tuple(r.prompt_ids) for r in side_rows} == {tuple(p.prompt_ids) for p in side_pairs}
        for row, before in zip(side_rows, side_rows[-1:] + side_rows[:-1]):  # the previous row's completion
            assert row.kl_ids == before.completion_ids and row.kl_labels == before.completion_labels
            assert row.prompt_ids != before.prompt_ids  # a mismatched pair, as KTO's reference point needs


def test_a_kto_file_trains_kto_only_and_rows_longer_than_max_seq_len_are_cut_or_dropped(tmp_path, tokenizer):
    rows = [{"prompt": "Q" * (i + 1), "completion": " word" * (4 + 30 * i), "label": i % 2 == 0} for i in range(4)]
    path = write_jsonl(tmp_path / "kto.jsonl", rows)
    with pytest.raises(ConfigError, match=r"holds labelled completions \(KTO\), but objective: dpo trains on "
                                          r"preference pairs; set objective to one of kto"):
        prepare_data(_config(path), tokenizer, 64, 0, objective="dpo")
    cut = prepare_data(_config(path, eval_fraction=0.0), tokenizer, 64, 0, objective="kto")
    assert cut.report.truncated == 3 and all(r.length <= 64 for r in cut.train)
    dropped = prepare_data(_config(path, eval_fraction=0.0, too_long="drop"), tokenizer, 64, 0, objective="kto")
    assert len(dropped.train) == 1 and dropped.report.dropped == {"longer than max_seq_len=64": 3}


def test_the_config_system_prompt_becomes_the_system_turn_of_pairs_without_one(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(2))
    pair = prepare_data(_config(path, eval_fraction=0.0, system_prompt="Answer in digits."), tokenizer, 96, 0,
                        objective="dpo").train[0]
    assert tokenizer.decode(pair.prompt_ids).startswith("<|im_start|>system\nAnswer in digits.<|im_end|>")


def _conversation(answer):
    return [{"role": "user", "content": "Q"}, {"role": "assistant", "content": answer}]


SAME_ANSWERS = [  # (a pair whose two answers are the same, one that differs) in each layout (HH-RLHF has such rows)
    ({"prompt": "Q", "chosen": "same", "rejected": "same"}, {"prompt": "Q", "chosen": "good", "rejected": "bad"}),
    ({"chosen": "\n\nHuman: Q\n\nAssistant: same", "rejected": "\n\nHuman: Q\n\nAssistant: same"},
     {"chosen": "\n\nHuman: Q\n\nAssistant: good", "rejected": "\n\nHuman: Q\n\nAssistant: bad"}),
    ({"chosen": _conversation("same"), "rejected": _conversation("same")},
     {"chosen": _conversation("good"), "rejected": _conversation("bad")}),
]


@pytest.mark.parametrize("objective", ["dpo", "kto"])
@pytest.mark.parametrize("same, differ", SAME_ANSWERS)
def test_pairs_whose_answers_are_the_same_are_dropped_and_counted(tmp_path, tokenizer, same, differ, objective):
    # nothing to prefer: DPO's loss is log 2 and its gradient 0 on such a pair, and unpaired for KTO the one
    # answer would be labelled desirable and undesirable
    path = write_jsonl(tmp_path / "pairs.jsonl", [differ, same, differ])
    data = prepare_data(_config(path, eval_fraction=0.0), tokenizer, 96, 0, objective=objective)
    assert data.report.kept == 2 and data.report.dropped == {"chosen and rejected the same": 1}


def test_turns_fit_the_chat_template_as_supervised_rows_do(tmp_path, tokenizer):
    from test_turns import ALTERNATING
    # HH-RLHF holds conversations with two Human turns in a row, which Llama-2's and Mistral's templates refuse
    hh = "\n\nHuman: Hi.\n\nHuman: What is 2+2?\n\nAssistant: {}"
    path = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": hh.format("4"), "rejected": hh.format("5")}])
    pair = prepare_data(_config(path, eval_fraction=0.0, chat_template=ALTERNATING), copy.deepcopy(tokenizer), 96,
                        0, objective="dpo")  # a copy: the chat_template setting changes the tokenizer
    assert tokenizer.decode(pair.train[0].prompt_ids).endswith("<|im_start|>user\nHi.\n\nWhat is 2+2?<|im_end|>\n"
                                                               "<|im_start|>assistant\n")
    assert pair.report.merged_turns == 1
    # a reasoning trace the template has no place for is written before the answer, not lost
    thought = {"role": "assistant", "content": "4", "reasoning_content": "Two and two."}
    path = write_jsonl(tmp_path / "kto.jsonl", [{"prompt": "2+2?", "completion": [thought], "label": True}])
    row = prepare_data(_config(path, eval_fraction=0.0), tokenizer, 96, 0, objective="kto").train[0]
    assert tokenizer.decode(row.completion_ids) == "<think>\nTwo and two.\n</think>\n\n4<|im_end|>\n"
    dropped = prepare_data(_config(path, eval_fraction=0.0, reasoning="drop"), tokenizer, 96, 0, objective="kto")
    assert tokenizer.decode(dropped.train[0].completion_ids) == "4<|im_end|>\n"


def test_tool_calls_a_template_would_not_render_are_refused_naming_the_row(tmp_path, tokenizer):
    call = {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "add", "arguments": "{}"}}]}
    row = {"prompt": "2+2?", "chosen": [call, {"role": "tool", "content": "4"}, {"role": "assistant", "content": "4"}],
           "rejected": "5"}
    path = write_jsonl(tmp_path / "pairs.jsonl", [row])
    with pytest.raises(ConfigError, match=r"pairs.jsonl:1: tool calls .* the chat template does not render them"):
        prepare_data(_config(path, eval_fraction=0.0), tokenizer, 96, 0, objective="dpo")


def test_a_kto_file_whose_labels_are_not_true_or_false_names_the_row_not_supervised_data(tmp_path, tokenizer):
    rows = [{"prompt": "Q", "completion": "a", "label": 1.0}, {"prompt": "R", "completion": "b", "label": 0.0}]
    path = write_jsonl(tmp_path / "kto.jsonl", rows)  # pandas writes a label column with a gap as floats
    with pytest.raises(ConfigError, match=r"kto.jsonl:1: field 'label' should be true or false, got 1.0"):
        prepare_data(_config(path, eval_fraction=0.0), tokenizer, 96, 0, objective="kto")
    with pytest.raises(ConfigError, match=r"holds supervised fine-tuning data"):  # under dpo: what it holds, as before
        prepare_data(_config(path, eval_fraction=0.0), tokenizer, 96, 0, objective="dpo")
