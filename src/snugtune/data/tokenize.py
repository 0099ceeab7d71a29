"""Rendering samples with the chat template and tokenizing them with a loss mask.

Only assistant turns are trained (unless train_on_prompt); each answer ends with EOS, which is
trained; a sample gets exactly one BOS. Labels use -100 for tokens the loss ignores.
"""

from __future__ import annotations

from dataclasses import dataclass

from snugtune.errors import ConfigError

IGNORE = -100

# Stated default for tokenizers that ship no chat template: ChatML, written to chat_template.jinja.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass
class TokenizedSample:
    input_ids: list[int]
    labels: list[int]

    @property
    def trained_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)


def ensure_chat_template(tokenizer) -> bool:
    """Give a template-less tokenizer the stated default; returns True when it did."""
    if getattr(tokenizer, "chat_template", None):
        return False
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return True


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    # transformers renders templates in a sandboxed jinja environment
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def _bos_prefix(tokenizer, first_text: str) -> list[int]:
    """[bos] when the tokenizer normally adds one and the rendered text does not already start with it."""
    bos = tokenizer.bos_token
    if not bos or tokenizer.bos_token_id is None or first_text.startswith(bos):
        return []
    adds_bos = tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]
    return [tokenizer.bos_token_id] if adds_bos else []


def tokenize_sample(sample: dict, tokenizer, where: str, train_on_prompt: bool = False) -> TokenizedSample:
    """Token ids and labels for one normalized sample (see data.formats)."""
    eos_id = tokenizer.eos_token_id
    if "text" in sample:
        ids = _encode(tokenizer, sample["text"])
        ids = _bos_prefix(tokenizer, sample["text"]) + ids + [eos_id]
        return TokenizedSample(ids, list(ids))

    messages = sample["messages"]
    segments: list[tuple[str, bool]] = []  # (rendered text, trained?)
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], add_generation_prompt=True)
        full = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise ConfigError(f"{where}: the chat template does not render turns as a prefix of the next; "
                              f"cannot locate the assistant tokens (set data.train_on_prompt: true or use "
                              f"another template)")
        segments.append((prompt[len(done):], False))
        segments.append((full[len(prompt):], True))
        done = full
    if not segments:
        raise ConfigError(f"{where}: the conversation has no assistant turn to train on")

    ids = _bos_prefix(tokenizer, segments[0][0])
    labels = [IGNORE] * len(ids)
    for text, trained in segments:
        piece = _encode(tokenizer, text)
        if trained and eos_id not in piece:  # templates without an end-of-turn token: end the answer with EOS
            piece = piece + [eos_id]
        ids += piece
        labels += piece if (trained or train_on_prompt) else [IGNORE] * len(piece)
    result = TokenizedSample(ids, labels)
    if result.trained_tokens == 0:  # never train silently on nothing
        raise ConfigError(f"{where}: no token of this sample is trained (every label is masked)")
    return result


def fit_length(sample: TokenizedSample, max_len: int, too_long: str) -> TokenizedSample | None:
    """Truncate or drop a sample longer than max_len; None when it is dropped or has nothing left to train."""
    if len(sample.input_ids) <= max_len:
        return sample
    if too_long == "drop":
        return None
    cut = TokenizedSample(sample.input_ids[:max_len], sample.labels[:max_len])
    return cut if cut.trained_tokens > 0 else None
