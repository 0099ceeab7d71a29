import copy

import pytest

from conftest import trained_text
from snugtune.errors import ConfigError
from snugtune.data.tokenize import IGNORE, TokenizedSample, split_document, tokenize_sample


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


def test_exactly_one_bos_when_the_tokenizer_adds_one_and_the_template_does_not(tokenizer):
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


def test_a_template_that_fails_on_a_row_is_an_error_naming_it(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}" \
                        "{% endif %}{{ m['content'] }}{% endfor %}"
    sample = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                           {"role": "assistant", "content": "A"}]}
    with pytest.raises(ConfigError, match="d.jsonl:3: the chat template cannot render this conversation .*no system"):
        tokenize_sample(sample, tok, "d.jsonl:3")


def test_text_is_trained_whole_and_a_long_document_splits_into_chunks_keeping_every_token(tokenizer):
    document = tokenize_sample({"text": "word " * 300}, tokenizer, "doc")
    assert document.input_ids[-1] == tokenizer.eos_token_id and all(lab != IGNORE for lab in document.labels)
    chunks = split_document(document, 128)
    assert [len(c.input_ids) for c in chunks] == [128, 128, len(document.input_ids) - 256]
    assert [t for c in chunks for t in c.input_ids] == document.input_ids
    assert split_document(TokenizedSample([1, 2], [1, 2]), 128) == [TokenizedSample([1, 2], [1, 2])]


class WithoutOffsets:
    """A tokenizer that cannot give character offsets, as Python tokenizers cannot."""

    def __init__(self, tokenizer):
        self.wrapped = tokenizer

    def __getattr__(self, name):
        return getattr(self.wrapped, name)

    def __call__(self, text, **kwargs):
        if kwargs.pop("return_offsets_mapping", False):
            raise NotImplementedError("return_offset_mapping is not available when using Python tokenizers")
        return self.wrapped(text, **kwargs)


def test_a_tokenizer_without_offsets_gets_the_same_tokens_and_labels(tokenizer):
    sample = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                           {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
                           {"role": "assistant", "content": "Goodbye, see you."}]}
    assert tokenize_sample(sample, WithoutOffsets(tokenizer), "row") == tokenize_sample(sample, tokenizer, "row")


class Recording(WithoutOffsets):
    """The tokenizer, noting the longest text it was given."""

    longest = 0

    def __call__(self, text, **kwargs):
        Recording.longest = max(Recording.longest, len(text))
        return self.wrapped(text, **kwargs)


def test_a_conversation_longer_than_the_budget_reaches_the_tokenizer_cut_with_the_same_first_tokens(tokenizer):
    from snugtune.data.tokenize import char_budget, fit_length
    budget = char_budget(tokenizer, 64)
    long_answer = {"messages": [{"role": "user", "content": "Tell me a story."},
                                {"role": "assistant", "content": "Once upon a time. " * 40_000}]}
    Recording.longest = 0
    bounded = tokenize_sample(long_answer, Recording(tokenizer), "row", max_chars=budget)
    assert Recording.longest <= budget + 1000 < len(long_answer["messages"][1]["content"])
    assert fit_length(bounded, 64, "truncate") == fit_length(tokenize_sample(long_answer, tokenizer, "row"), 64, "truncate")
    long_prompt = {"messages": [{"role": "user", "content": "word " * 500_000}, {"role": "assistant", "content": "Yes."}]}
    assert fit_length(tokenize_sample(long_prompt, tokenizer, "row", max_chars=budget), 64, "truncate") is None
    short = {"messages": long_answer["messages"][:1] + [{"role": "assistant", "content": "The end."}]}
    assert tokenize_sample(short, tokenizer, "row", max_chars=budget) == tokenize_sample(short, tokenizer, "row")


@pytest.mark.parametrize("text", ["".join(f"Line {i} of a long document.\n" for i in range(2000)),
                                  "".join(f"word{i} " for i in range(5000))], ids=["lines", "one line"])
def test_a_long_document_is_tokenized_a_block_at_a_time_into_the_same_tokens(tokenizer, monkeypatch, text):
    from snugtune.data import tokenize
    document = {"text": text}
    whole = tokenize_sample(document, tokenizer, "doc")
    monkeypatch.setattr(tokenize, "DOCUMENT_BLOCK_CHARS", 1000)
    Recording.longest = 0
    assert tokenize_sample(document, Recording(tokenizer), "doc") == whole and Recording.longest <= 1000
