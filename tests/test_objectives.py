"""objectives.py: the table of objectives agrees with the config, the planner's rules and the data kinds, and
held-out batches of preference examples hold no more than a training micro-batch."""

import typing

from conftest import pair_rows, write_jsonl
from snugtune.config import Config, DataConfig
from snugtune.data.preference_rows import OBJECTIVES_OF_KIND
from snugtune.data.prepare import prepare_data
from snugtune.evaluate.tasks import DEFAULT_TASKS
from snugtune.memory_rules import SEQUENCES_PER_ROW, objective_replays, reference_for
from snugtune.objectives import OBJECTIVES, training_objective


def test_the_table_of_objectives_is_the_configs_and_the_planners(tmp_path, tokenizer):
    names = set(OBJECTIVES)
    assert names == set(typing.get_args(Config.model_fields["objective"].annotation)) == set(SEQUENCES_PER_ROW)
    assert names == set(DEFAULT_TASKS) == {o for objectives in OBJECTIVES_OF_KIND.values() for o in objectives}
    config = DataConfig(path=str(write_jsonl(tmp_path / "p.jsonl", pair_rows(4))), eval_fraction=0.0)
    for name, objective in OBJECTIVES.items():
        assert objective.name == name and objective.packs_rows == (name == "sft"), name
        assert objective_replays(name) == (objective.step_state is None), name  # KTO's step state: not in a graph
        data = config.model_copy(update={"columns": {"completion": "chosen"}}) if name == "sft" else config
        example = prepare_data(data, tokenizer, 96, 0, objective=name).train[0]
        t = training_objective(Config(data=data, objective=name))
        rows = t.collate([[example]], tokenizer.pad_token_id, packed=False)["input_ids"].shape[0]
        assert rows == SEQUENCES_PER_ROW[name], name  # the sequences the planner sizes a row by
        references = reference_for(name, True, False) == "adapter"  # then the batch needs a reference forward
        assert references == (name in ("dpo", "kto")), name


def test_held_out_preference_batches_hold_at_most_a_micro_batch_of_examples(tmp_path, tokenizer):
    config = DataConfig(path=str(write_jsonl(tmp_path / "p.jsonl", pair_rows(10))), eval_fraction=0.0)
    pairs = prepare_data(config, tokenizer, 96, 0, objective="dpo").train
    t = training_objective(Config(data=config, objective="dpo"))
    batches = t.held_out_batches(pairs, 4, tokenizer.pad_token_id, max_len=96, max_tokens=3 * 96)
    assert [int(b["examples"]) for b in batches] == [3, 3, 3, 1]
    assert [int(b["examples"]) for b in t.held_out_batches(pairs, 4, tokenizer.pad_token_id)] == [4, 4, 2]
    assert all(b["input_ids"].shape[0] == 2 * int(b["examples"]) for b in batches)  # chosen rows, rejected rows


def test_lengths_vary_where_the_datas_sequences_pad_to_several_lengths(tmp_path, tokenizer):
    # what the planner sizes a preference step's CUDA graphs by: one shape, or shapes that run beside the pool
    config = DataConfig(path=str(write_jsonl(tmp_path / "p.jsonl", pair_rows(8))), eval_fraction=0.0)
    t = training_objective(Config(data=config, objective="dpo"))
    examples = prepare_data(config, tokenizer, 96, 0, objective="dpo").train
    rows = [[e] for e in examples]
    lengths = {n for e in examples for n in (len(e.prompt_ids) + len(e.chosen_ids),
                                             len(e.prompt_ids) + len(e.rejected_ids))}
    assert len(lengths) > 1 and t.lengths_vary(rows, 1)
    assert not t.lengths_vary(rows, 4096)  # every sequence pads to one multiple
    sft = training_objective(Config(data=config))
    assert not sft.lengths_vary([["packed row"]], 1)  # packed rows: counted as full
