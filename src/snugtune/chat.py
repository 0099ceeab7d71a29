"""Chatting with a fine-tuned run (base + adapter) or a merged model folder: the chat template,
streamed output, multi-turn history, /reset and /exit."""

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
    path = Path(path)
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


@torch.no_grad()
def reply(model, tokenizer, history: list[dict], device, precision, max_new_tokens: int = 256,
          stream: Callable[[str], None] | None = None) -> str:
    """Generate the assistant's next turn for `history` (greedy), streaming text pieces to `stream`."""
    from transformers import TextStreamer

    prompt = tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
    enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(device)

    class _Sink(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if stream is not None and text:
                stream(text)
    streamer = _Sink(tokenizer, skip_prompt=True, skip_special_tokens=True)
    with precision.autocast():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def chat_loop(model, tokenizer, device, precision, read: Callable[[str], str], write: Callable[[str], None],
              max_new_tokens: int = 256) -> None:
    """Interactive turns until /exit or end of input; /reset clears the history."""
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
        write("model> ")
        answer = reply(model, tokenizer, history, device, precision, max_new_tokens, stream=write)
        write("\n")
        history.append({"role": "assistant", "content": answer})
