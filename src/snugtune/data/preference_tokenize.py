"""Tokenizing preference pairs and labelled completions with the model's chat template, and fitting them to
max_seq_len.

Each answer is tokenized as the conversation prompt + answer reads at inference (data.tokenize, so BOS, EOS
and the template's turn markers are placed as for supervised data); only the answer's assistant turns are
scored (earlier assistant turns of the prompt are context). The prompt is the tokens both answers of a pair
share before their first scored token, as TRL takes the common prefix of prompt and prompt + answer. (A KTO
row has no second answer to diverge from: under a template whose prompt ends in a space, the token joining
that space to the completion's first word stays with the prompt, unscored, as in supervised data.)

Truncation follows TRL 1.16 (max_length with truncation_mode keep_start): a sequence longer than max_seq_len
loses its answer's end, and a pair or row whose prompt leaves no answer token is dropped. With data.too_long:
drop, every pair or row with a sequence longer than max_seq_len is dropped instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from snugtune.data.preference_rows import LabelledCompletion, PreferencePair
from snugtune.data.tokenize import IGNORE, TokenizedSample, tokenize_sample
from snugtune.data.turns import untrained


def _scored(labels: list[int]) -> int:
    return sum(1 for label in labels if label != IGNORE)


@dataclass
class TokenizedPair:
    """The shared prompt's ids, and each answer's ids with their labels (IGNORE: not scored). `reference_logps`:
    the reference model's log-probabilities of (chosen, rejected), where they are computed before training."""
    prompt_ids: list[int]
    chosen_ids: list[int]
    chosen_labels: list[int]
    rejected_ids: list[int]
    rejected_labels: list[int]
    reference_logps: tuple[float, float] | None = None

    @property
    def length(self) -> int:
        """Tokens of both sequences (prompt + chosen, prompt + rejected)."""
        return 2 * len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)

    @property
    def trained_tokens(self) -> int:
        """Tokens scored: both answers'."""
        return _scored(self.chosen_labels) + _scored(self.rejected_labels)


@dataclass
class TokenizedCompletion:
    """A KTO row: its prompt and scored completion, its label, and the mismatched completion (another row's)
    that KTO's reference point pairs its prompt with (kl_partners). `reference_logps`: the reference model's
    log-probabilities of (completion, mismatched completion), where they are computed before training."""
    prompt_ids: list[int]
    completion_ids: list[int]
    completion_labels: list[int]
    desirable: bool
    kl_ids: list[int] | None = None
    kl_labels: list[int] | None = None
    reference_logps: tuple[float, float] | None = None

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)

    @property
    def trained_tokens(self) -> int:
        return _scored(self.completion_labels)


def answer_sample(prompt: list[dict], answer: list[dict], tools: list[dict] | None) -> dict:
    """The normalized sample (data.formats) of a prompt and one answer, trained on the answer alone."""
    return {"messages": untrained(prompt) + answer, **({"tools": tools} if tools else {})}


def _first_scored(sample: TokenizedSample) -> int:
    return next(i for i, label in enumerate(sample.labels) if label != IGNORE)


def _shared_prefix(a: list[int], b: list[int], limit: int) -> int:
    length = 0
    while length < limit and a[length] == b[length]:
        length += 1
    return length


def _answer_part(sample: TokenizedSample, cut: int) -> tuple[list[int], list[int]]:
    """The ids and labels after the shared prompt. A token there before the first scored one differs between
    the answers, so it holds answer text (a template ending in a space joins it to the answer's first word):
    it is scored, as TRL scores from where the two sequences diverge."""
    first = _first_scored(sample)
    return sample.input_ids[cut:], sample.input_ids[cut:first] + sample.labels[first:]


def tokenize_pair(pair: PreferencePair, tokenizer, where: str) -> TokenizedPair:
    chosen = tokenize_sample(answer_sample(pair.prompt, pair.chosen, pair.tools), tokenizer, where)
    rejected = tokenize_sample(answer_sample(pair.prompt, pair.rejected, pair.tools), tokenizer, where)
    cut = _shared_prefix(chosen.input_ids, rejected.input_ids, min(_first_scored(chosen), _first_scored(rejected)))
    return TokenizedPair(chosen.input_ids[:cut], *_answer_part(chosen, cut), *_answer_part(rejected, cut))


def tokenize_labelled(row: LabelledCompletion, tokenizer, where: str) -> TokenizedCompletion:
    sample = tokenize_sample(answer_sample(row.prompt, row.completion, row.tools), tokenizer, where)
    cut = _first_scored(sample)
    return TokenizedCompletion(sample.input_ids[:cut], sample.input_ids[cut:], sample.labels[cut:], row.desirable)


def _scores_some(labels: list[int]) -> bool:
    return _scored(labels) > 0


def fit_pair(pair: TokenizedPair, max_len: int, too_long: str) -> TokenizedPair | None:
    """The pair within max_len tokens per sequence (module docstring); None when it is dropped."""
    room = max_len - len(pair.prompt_ids)
    if max(len(pair.chosen_ids), len(pair.rejected_ids)) <= room:
        return pair
    if too_long == "drop" or room <= 0:
        return None
    cut = TokenizedPair(pair.prompt_ids, pair.chosen_ids[:room], pair.chosen_labels[:room],
                        pair.rejected_ids[:room], pair.rejected_labels[:room])
    return cut if _scores_some(cut.chosen_labels) and _scores_some(cut.rejected_labels) else None


def fit_completion(row: TokenizedCompletion, max_len: int, too_long: str) -> TokenizedCompletion | None:
    """The row within max_len tokens (module docstring); None when it is dropped."""
    room = max_len - len(row.prompt_ids)
    if len(row.completion_ids) <= room:
        return row
    if too_long == "drop" or room <= 0:
        return None
    cut = TokenizedCompletion(row.prompt_ids, row.completion_ids[:room], row.completion_labels[:room], row.desirable)
    return cut if _scores_some(cut.completion_labels) else None


def kl_partners(rows: list[TokenizedCompletion], max_len: int) -> list[TokenizedCompletion]:
    """The rows, each given the completion of the row before it (the last row's for the first), cut to fit
    max_len after its prompt: the mismatched pairs KTO's reference point is estimated from. TRL's KTOTrainer
    rotates completions this way within each batch; fixed here once, in the data's order, the mismatched
    pairs do not depend on how a step's rows are split into micro-batches."""
    for row, other in zip(rows, rows[-1:] + rows[:-1]):
        room = max(max_len - len(row.prompt_ids), 0)  # TRL cuts the KL sequences to max_length too
        row.kl_ids, row.kl_labels = other.completion_ids[:room], other.completion_labels[:room]
    return rows
