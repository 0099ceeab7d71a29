"""data/preference_batches.py: which tokens add to which answer's log-probability, padded or packed."""

import torch

from snugtune.data.preference_batches import kl_rows, labelled_batch, pair_batch
from snugtune.data.preference_tokenize import TokenizedCompletion, TokenizedPair, kl_partners
from snugtune.data.tokenize import IGNORE
from snugtune.preference_loss import group_logps

PAIRS = [TokenizedPair([1, 2, 3], [10, 11], [10, 11], [20, 21, 22], [20, IGNORE, 22]),
         TokenizedPair([4, 5], [12, 13, 14, 15], [12, 13, 14, 15], [23], [23])]


def groups_of(batch) -> list[list[tuple[int, int]]]:
    """Per row: (token, group) of every scored position."""
    t = batch.tensors
    return [[(int(tok), int(g)) for tok, lab, g in zip(ids, labels, groups) if lab != IGNORE]
            for ids, labels, groups in zip(t["input_ids"], t["labels"], t["label_groups"])]


def test_padded_pairs_are_chosen_rows_then_rejected_rows_each_answer_its_own_group():
    batch = pair_batch(PAIRS, pad_id=0)
    assert batch.groups == 4
    assert batch.tensors["input_ids"].tolist() == [[1, 2, 3, 10, 11, 0], [4, 5, 12, 13, 14, 15],
                                                   [1, 2, 3, 20, 21, 22], [4, 5, 23, 0, 0, 0]]
    assert groups_of(batch) == [[(10, 0), (11, 0)], [(12, 1), (13, 1), (14, 1), (15, 1)],
                                [(20, 2), (22, 2)], [(23, 3)]]


def test_orpo_scores_the_chosen_prompt_as_a_group_of_its_own():
    batch = pair_batch(PAIRS, pad_id=0, prompt_nll=True)
    assert batch.groups == 6
    assert groups_of(batch)[:2] == [[(2, 4), (3, 4), (10, 0), (11, 0)], [(5, 5), (12, 1), (13, 1), (14, 1), (15, 1)]]
    assert groups_of(batch)[2:] == groups_of(pair_batch(PAIRS, pad_id=0))[2:]  # rejected prompts are not scored


def test_packed_pairs_give_every_answer_the_log_probability_it_has_alone(tmp_path, alpaca_file):
    from conftest import tiny_model
    _, model, _, _ = tiny_model(tmp_path, alpaca_file)
    model.eval()
    g = torch.Generator().manual_seed(0)

    def ids(n):
        return torch.randint(5, 900, (n,), generator=g).tolist()

    pairs = []
    for prompt_len, chosen_len, rejected_len in ((7, 5, 9), (3, 12, 2), (11, 4, 4)):
        chosen, rejected = ids(chosen_len), ids(rejected_len)
        pairs.append(TokenizedPair(ids(prompt_len), chosen, chosen, rejected, rejected))
    with torch.no_grad():
        padded = group_logps(model, pair_batch(pairs, 0, prompt_nll=True).tensors, 9)
        packed_batch = pair_batch(pairs, 0, prompt_nll=True, packed=True)
        packed = group_logps(model, packed_batch.tensors, 9)
    assert packed_batch.tensors["input_ids"].shape[0] == 3 and "cu_seq_lens" in packed_batch.tensors
    torch.testing.assert_close(packed[0], padded[0], rtol=1e-5, atol=1e-4)
    assert torch.equal(packed[1], padded[1])


def test_kto_kl_rows_pair_each_prompt_with_the_previous_rows_completion_cut_to_max_len():
    rows = [TokenizedCompletion([1, 2], [10, 11, 12], [10, 11, 12], True),
            TokenizedCompletion([3, 4, 5, 6], [13], [13], False),
            TokenizedCompletion([7], [14, 15], [IGNORE, 15], True)]
    batch = labelled_batch(kl_partners(rows, max_len=6), pad_id=0)
    assert batch.tensors["desirable"].tolist() == [True, False, True] and batch.groups == 3
    assert groups_of(batch) == [[(10, 0), (11, 0), (12, 0)], [(13, 1)], [(15, 2)]]
    mismatched = type(batch)(kl_rows(batch.tensors), 3)
    assert mismatched.tensors["input_ids"].tolist() == [[1, 2, 14, 15, 0, 0], [3, 4, 5, 6, 10, 11],
                                                        [7, 13, 0, 0, 0, 0]]
    assert groups_of(mismatched) == [[(15, 0)], [(10, 1), (11, 1)], [(13, 2)]]


def test_precomputed_reference_log_probabilities_ride_with_their_batch():
    pairs = [TokenizedPair(p.prompt_ids, p.chosen_ids, p.chosen_labels, p.rejected_ids, p.rejected_labels,
                           reference_logps=(-1.0 - i, -5.0 - i)) for i, p in enumerate(PAIRS)]
    batch = pair_batch(pairs, pad_id=0)
    assert batch.tensors["reference_logps"].tolist() == [-1.0, -2.0, -5.0, -6.0] and int(batch.tensors["examples"]) == 2
    assert "reference_logps" not in pair_batch(PAIRS + pairs[:1], pad_id=0).tensors  # only when every pair has them
    rows = kl_partners([TokenizedCompletion([1], [2], [2], True, reference_logps=(-0.5, -0.25)),
                        TokenizedCompletion([3], [4], [4], False, reference_logps=(-0.75, -0.125))], max_len=4)
    tensors = labelled_batch(rows, pad_id=0).tensors
    assert tensors["reference_logps"].tolist() == [-0.5, -0.75]
    assert kl_rows(tensors)["reference_logps"].tolist() == [-0.25, -0.125]
