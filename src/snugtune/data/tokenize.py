"""Rendering samples with the chat template and tokenizing them with a loss mask.

Only assistant turns are trained (unless train_on_prompt); each answer ends with EOS, which is
trained; a sample gets exactly one BOS. Labels use -100 for tokens the loss ignores.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass

from snugtune.errors import ConfigError
from snugtune.data.templates import opening_prompt, render
from snugtune.data.turns import trained

IGNORE = -100


@dataclass
class TokenizedSample:
    input_ids: list[int]
    labels: list[int]

    @property
    def trained_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)

    @property
    def length(self) -> int:
        return len(self.input_ids)


DOCUMENT_BLOCK_CHARS = 1 << 20  # a text document is tokenized a block at a time (the tokenizer's memory is bounded)


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def _encode_document(tokenizer, text: str) -> list[int]:
    """A document's ids, tokenized in blocks of at most DOCUMENT_BLOCK_CHARS, so that a file of any size never
    reaches the tokenizer whole. A block ends after a line break, or else before a space (where tokenizers
    start a word), so that it splits no token where there is one."""
    ids, start = [], 0
    while start < len(text):
        end = min(start + DOCUMENT_BLOCK_CHARS, len(text))
        if end < len(text):
            newline, space = text.rfind("\n", start, end), text.rfind(" ", start + 1, end)
            end = newline + 1 if newline >= start else space if space > start else end
        ids += _encode(tokenizer, text[start:end])
        start = end
    return ids


def char_budget(tokenizer, max_seq_len: int) -> int:
    """Characters of rendered text that surely hold more than max_seq_len tokens: no token spells more
    characters than the longest in the vocabulary, doubled for safety. Text past it is never trained (it
    is truncated or dropped with its sample), so it is not tokenized."""
    longest = max((len(t) for t in tokenizer.get_vocab()), default=1)
    return 2 * (max_seq_len + 1) * max(longest, 1)


def _bos_prefix(tokenizer, first_text: str) -> list[int]:
    """[bos] when the tokenizer normally adds one and the rendered text does not already start with it."""
    bos = tokenizer.bos_token
    if not bos or tokenizer.bos_token_id is None or first_text.startswith(bos):
        return []
    adds_bos = tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]
    return [tokenizer.bos_token_id] if adds_bos else []


def tokenize_sample(sample: dict, tokenizer, where: str, train_on_prompt: bool = False,
                    max_chars: int | None = None) -> TokenizedSample:
    """Token ids and labels for one normalized sample (see data.normalize): the assistant turns of a
    conversation, as the chat template renders them, or every token of a text document. A conversation's
    rendered text is cut at max_chars (see char_budget): only its first max_seq_len tokens are kept."""
    if "text" in sample:
        ids = _encode_document(tokenizer, sample["text"])
        ids = _bos_prefix(tokenizer, sample["text"]) + ids + [tokenizer.eos_token_id]
        return TokenizedSample(ids, list(ids))

    messages, tools = sample["messages"], sample.get("tools")
    segments: list[tuple[str, bool]] = []  # (rendered text, trained?)
    done = ""
    for i, message in enumerate(messages):
        if not trained(message):
            continue
        if max_chars is not None and len(done) > max_chars:
            break  # every later answer starts past max_seq_len
        prompt = render(tokenizer, messages[:i], True, tools, where) if i else opening_prompt(tokenizer, tools, where)
        full = render(tokenizer, messages[: i + 1], False, tools, where)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise ConfigError(f"{where}: the chat template does not render turns as a prefix of the next; "
                              f"cannot locate the assistant tokens (set data.train_on_prompt: true or use "
                              f"another template)")
        segments.append((prompt[len(done):], False))
        segments.append((full[len(prompt):], True))
        done = full
    if not segments:
        raise ConfigError(f"{where}: the conversation has no assistant turn to train on")

    cut = max_chars is not None and len(done) > max_chars
    result = _label_segments(tokenizer, _cut(segments, max_chars) if cut else segments, train_on_prompt)
    if result.trained_tokens == 0 and not cut:  # never train silently on nothing
        raise ConfigError(f"{where}: no token of this sample is trained (every label is masked)")
    return result


def _cut(segments: list[tuple[str, bool]], max_chars: int) -> list[tuple[str, bool]]:
    """The segments' first max_chars characters."""
    kept, room = [], max_chars
    for text, is_trained in segments:
        if room <= 0:
            break
        kept.append((text[:room], is_trained))
        room -= len(text)
    return kept


def _label_segments(tokenizer, segments: list[tuple[str, bool]], train_on_prompt: bool) -> TokenizedSample:
    """Tokenize the rendered conversation as one text, as it reads at inference, and train the tokens of
    the trained segments. (Tokenized apart, each answer of a SentencePiece tokenizer would begin with a
    word-start piece that the prompt at inference never leads to.)"""
    # a template that adds no end-of-turn token: the answer ends with EOS, trained
    texts = [text + tokenizer.eos_token if is_trained and tokenizer.eos_token not in text else text
             for text, is_trained in segments]
    flags = [is_trained or train_on_prompt for _, is_trained in segments]
    whole = "".join(texts)
    ids, ends = _tokens_and_segment_ends(tokenizer, whole, texts)
    labels, at = [], 0
    for end, is_trained in zip(ends, flags):
        labels += ids[at:end] if is_trained else [IGNORE] * (end - at)
        at = end
    bos = _bos_prefix(tokenizer, whole)
    return TokenizedSample(bos + ids, [IGNORE] * len(bos) + labels)


def _tokens_and_segment_ends(tokenizer, whole: str, texts: list[str]) -> tuple[list[int], list[int]]:
    """The ids of the whole text and, for each segment, the number of tokens up to its end: from character
    offsets, or, for tokenizers without them (Python ones), by tokenizing the text up to each end."""
    char_ends = list(itertools.accumulate(len(t) for t in texts))
    try:
        encoded = tokenizer(whole, add_special_tokens=False, return_offsets_mapping=True)
        starts = [start for start, _ in encoded["offset_mapping"]]
    except (NotImplementedError, ValueError, KeyError):
        ids = _encode(tokenizer, whole)
        return ids, [len(_encode(tokenizer, whole[:end])) for end in char_ends[:-1]] + [len(ids)]
    return encoded["input_ids"], [bisect.bisect_left(starts, end) for end in char_ends]


def fit_length(sample: TokenizedSample, max_len: int, too_long: str) -> TokenizedSample | None:
    """Truncate or drop a sample longer than max_len; None when it is dropped or has nothing left to train."""
    if len(sample.input_ids) <= max_len:
        return sample
    if too_long == "drop":
        return None
    cut = TokenizedSample(sample.input_ids[:max_len], sample.labels[:max_len])
    return cut if cut.trained_tokens > 0 else None


def split_document(sample: TokenizedSample, max_len: int) -> list[TokenizedSample]:
    """A text document longer than max_len as consecutive chunks of max_len tokens (packing fills rows
    with them), so no token of it is thrown away."""
    return [TokenizedSample(sample.input_ids[k:k + max_len], sample.labels[k:k + max_len])
            for k in range(0, len(sample.input_ids), max_len)]
