"""Chatting with a fine-tuned run (base + adapter) or a merged model folder: the chat template,
streamed output, multi-turn history, /reset and /exit. Every prompt is fitted to the model's context
before the model runs: old turns are dropped, a message too long on its own is refused at once."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from snugtune.errors import UserError
from snugtune.precision import resolve_device, resolve_precision


def load_for_chat(path: str | Path, device: str = "auto", trust=None):
    """(model, tokenizer, device, precision) from a run directory or a merged HF folder. `trust`
    (evaluate.run.Trust, the command line's) decides remote code and pickle weights, never the folder."""
    from snugtune.evaluate.run import Trust, load_run
    trust = trust or Trust()
    path = Path(path).expanduser()
    if (path / "config.yaml").is_file():
        run = load_run(path, device, trust)
        return run.model, run.tokenizer, run.device, run.precision
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: neither a snugtune run directory (no config.yaml) nor a Hugging Face model folder "
                        f"(no config.json); pass a run's output_dir or a `snugtune merge` output")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    dev = resolve_device(device)
    precision = resolve_precision("auto", dev)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust.remote_code)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=precision.compute_dtype, trust_remote_code=trust.remote_code,
                                                 use_safetensors=None if trust.pickle_weights else True).to(dev).eval()
    return model, tokenizer, dev, precision


MESSAGE_MAX_CHARS = 1 << 20  # longer than any context: refused before it is even tokenized
_CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def context_length(model, tokenizer) -> int | None:
    """Tokens the model attends over (its config's context length, else the tokenizer's limit); None if unknown."""
    for name in _CONTEXT_FIELDS:
        value = getattr(model.config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 10**8 else None  # transformers' "no limit" is 1e30


def fit_to_context(tokenizer, history: list[dict], context: int | None, max_new_tokens: int,
                   notify: Callable[[str], None]) -> tuple[list[int], int]:
    """The prompt's token ids and the answer's length, both within the model's context: the oldest turns of
    `history` are dropped (in place, with a notice) until the prompt fits, and the answer is cut short (with a
    notice) where the context leaves less room than max_new_tokens. A last message that alone leaves no room
    for an answer is a UserError, said at once instead of running the model over it."""
    last = history[-1]["content"]
    if len(last) > MESSAGE_MAX_CHARS:
        raise UserError(f"the message is {len(last):,} characters, more than any model's context "
                        f"(at most {MESSAGE_MAX_CHARS:,}); shorten it")
    start = 0  # history[start:] is the prompt: the oldest user message and its answer go first
    while True:
        ids = tokenizer.apply_chat_template(history[start:], tokenize=True, add_generation_prompt=True,
                                            return_dict=False)
        if context is None or len(ids) < context or start >= len(history) - 1:
            break
        start += 2
    if context is not None and len(ids) >= context:
        history.pop()  # the conversation before it stays as it was
        raise UserError(f"the message is {len(ids):,} tokens with the chat template; the model's context holds "
                        f"{context:,} and needs room for the answer: shorten it")
    if start:
        del history[:start]
        notify(f"(the {start} oldest messages no longer fit the model's context of {context:,} tokens: left out)")
    room = max_new_tokens if context is None else min(max_new_tokens, context - len(ids))
    if room < max_new_tokens:
        notify(f"(answer limited to {room:,} tokens: the prompt fills {len(ids):,} of the model's context of "
               f"{context:,})")
    return list(ids), room


def reply(model, tokenizer, history: list[dict], device, precision, max_new_tokens: int = 256,
          stream: Callable[[str], None] | None = None, notify: Callable[[str], None] = lambda message: None) -> str:
    """Generate the assistant's next turn for `history` (greedy), streaming text pieces to `stream`, the
    prompt fitted to the model's context first (fit_to_context: old turns dropped, or a UserError)."""
    ids, new_tokens = fit_to_context(tokenizer, history, context_length(model, tokenizer), max_new_tokens, notify)
    return generate_reply(model, tokenizer, ids, new_tokens, device, precision, stream)


@torch.no_grad()
def generate_reply(model, tokenizer, ids: list[int], new_tokens: int, device, precision,
                   stream: Callable[[str], None] | None = None) -> str:
    """Greedy generation after the prompt's token ids, streaming text pieces to `stream`."""
    from transformers import TextStreamer

    input_ids = torch.tensor([ids], device=device)

    class _Sink(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if stream is not None and text:
                stream(text)
    streamer = _Sink(tokenizer, skip_prompt=True, skip_special_tokens=True)
    with precision.autocast():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             max_new_tokens=new_tokens, do_sample=False, streamer=streamer,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True).strip()


def chat_loop(model, tokenizer, device, precision, read: Callable[[str], str], write: Callable[[str], None],
              max_new_tokens: int = 256) -> None:
    """Interactive turns until /exit or end of input; /reset clears the history. A message too long for the
    model's context is refused with a line and the conversation goes on."""
    history: list[dict] = []
    write("chat with the fine-tuned model; /reset clears the conversation, /exit quits\n")
    while True:
        try:
            text = read("you> ").strip()
        except EOFError:
            write("\n")
            return
        if text == "/exit":
            return
        if text == "/reset":
            history.clear()
            write("(conversation cleared)\n")
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        try:
            ids, new_tokens = fit_to_context(tokenizer, history, context_length(model, tokenizer), max_new_tokens,
                                             lambda message: write(message + "\n"))
        except UserError as exc:
            write(f"({exc})\n")
            continue
        write("model> ")
        answer = generate_reply(model, tokenizer, ids, new_tokens, device, precision, stream=write)
        write("\n")
        history.append({"role": "assistant", "content": answer})
