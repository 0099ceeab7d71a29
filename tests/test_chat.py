"""chat.py: one-shot and interactive chat with a fine-tuned run."""

import subprocess
import sys

import pytest

from snugtune.evaluate.run import load_run


@pytest.mark.slow
def test_chat_one_shot_prints_the_models_answer(qlora_run):
    from snugtune.chat import reply
    run = load_run(qlora_run, "cpu")
    pieces = []
    text = reply(run.model, run.tokenizer, [{"role": "user", "content": "Add 2 and 3."}], run.device, run.precision,
                 max_new_tokens=12, stream=pieces.append)
    assert text and "".join(pieces).strip() == text
    proc = subprocess.run([sys.executable, "-m", "snugtune", "chat", str(qlora_run), "--prompt", "Add 2 and 3.",
                           "--max-new-tokens", "12", "--device", "cpu"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == text


def test_interactive_chat_keeps_history_and_resets():
    from snugtune import chat as chat_module
    seen = []

    def fake_reply(model, tokenizer, history, device, precision, max_new_tokens, stream):
        seen.append([m["content"] for m in history])
        stream("ok")
        return "ok"
    inputs = iter(["hi", "again", "/reset", "fresh", "/exit"])
    original, chat_module.reply = chat_module.reply, fake_reply
    try:
        chat_module.chat_loop(None, None, None, None, read=lambda _: next(inputs), write=lambda _: None)
    finally:
        chat_module.reply = original
    assert seen == [["hi"], ["hi", "ok", "again"], ["fresh"]]
