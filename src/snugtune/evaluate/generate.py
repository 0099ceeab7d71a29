"""Batched greedy generation with stop strings, for sample prompts, HumanEval and chat."""

from __future__ import annotations

import torch


def render_chat_prompt(tokenizer, user_text: str, history: list[dict] | None = None) -> str:
    messages = [*(history or []), {"role": "user", "content": user_text}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def cut_at_stops(text: str, stops: list[str]) -> str:
    """The text up to the first stop string."""
    cut = len(text)
    for stop in stops:
        at = text.find(stop)
        if at != -1:
            cut = min(cut, at)
    return text[:cut]


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], device: torch.device, precision, max_new_tokens: int = 256,
             stops: list[str] | None = None, batch_size: int = 8) -> list[str]:
    """Greedy completions of raw prompt strings (already templated where wanted), cut at EOS or a stop."""
    stops = stops or []
    outputs: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        with precision.autocast():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                 stop_strings=stops or None, tokenizer=tokenizer if stops else None)
        for row in out[:, enc["input_ids"].shape[1]:]:
            outputs.append(cut_at_stops(tokenizer.decode(row, skip_special_tokens=True), stops))
    return outputs
