"""chat.py: one-shot and interactive chat with a fine-tuned run."""

import subprocess
import sys
import time

import pytest

from snugtune import chat as chat_module
from snugtune.chat import fit_to_context, load_for_chat, reply
from snugtune.errors import UserError
from snugtune.evaluate.run import load_run
from snugtune.models.resolve import resolve_model


@pytest.mark.slow
def test_chat_one_shot_prints_the_models_answer(qlora_run):
    run = load_run(qlora_run, "cpu")
    pieces = []
    text = reply(run.model, run.tokenizer, [{"role": "user", "content": "Add 2 and 3."}], run.device, run.precision,
                 max_new_tokens=12, stream=pieces.append)
    assert text and "".join(pieces).strip() == text
    proc = subprocess.run([sys.executable, "-m", "snugtune", "chat", str(qlora_run), "--prompt", "Add 2 and 3.",
                           "--max-new-tokens", "12", "--device", "cpu"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == text


@pytest.fixture(scope="module")
def tiny_chat():
    """(model, tokenizer, device, precision) of the random shape:tiny model (context 2,048), as `chat` loads a
    merged model folder."""
    return load_for_chat(resolve_model("shape:tiny").path, "cpu")


def test_interactive_chat_keeps_history_and_resets(tiny_chat, monkeypatch):
    model, tokenizer, device, precision = tiny_chat
    prompts = []

    def fake_generate(model, tokenizer, ids, new_tokens, device, precision, stream):
        prompts.append(tokenizer.decode(ids))
        stream("ok")
        return "ok"
    monkeypatch.setattr(chat_module, "generate_reply", fake_generate)
    inputs = iter(["hi", "again", "/reset", "fresh", "/exit"])
    chat_module.chat_loop(model, tokenizer, device, precision, read=lambda _: next(inputs), write=lambda _: None)
    assert len(prompts) == 3 and "hi" in prompts[1] and "ok" in prompts[1] and "again" in prompts[1]
    assert "fresh" in prompts[2] and "hi" not in prompts[2]


def test_a_prompt_longer_than_the_context_is_refused_at_once(tiny_chat):
    model, tokenizer, device, precision = tiny_chat
    for text in ("word " * 5000, "x" * (chat_module.MESSAGE_MAX_CHARS + 1)):
        started = time.perf_counter()
        with pytest.raises(UserError, match="shorten it"):
            reply(model, tokenizer, [{"role": "user", "content": text}], device, precision, max_new_tokens=4)
        assert time.perf_counter() - started < 5


def test_old_turns_are_dropped_and_the_answer_cut_to_fit_the_context(tiny_chat):
    model, tokenizer, device, precision = tiny_chat
    notices = []
    history = [{"role": "user", "content": "word " * 1200}, {"role": "assistant", "content": "fine"},
               {"role": "user", "content": "word " * 1200}, {"role": "assistant", "content": "fine"},
               {"role": "user", "content": "short question"}]
    ids, new_tokens = fit_to_context(tokenizer, history, 2048, 256, notices.append)
    assert [m["content"] for m in history] == ["word " * 1200, "fine", "short question"]
    assert notices == ["(the 2 oldest messages no longer fit the model's context of 2,048 tokens: left out)"]
    assert len(ids) < 2048 and new_tokens == 256
    notices.clear()
    history = [{"role": "user", "content": "word " * 2000}]
    ids, new_tokens = fit_to_context(tokenizer, history, 2048, 256, notices.append)
    assert new_tokens == 2048 - len(ids) < 256 and "answer limited to" in notices[0]
    answer = reply(model, tokenizer, [{"role": "user", "content": "word " * 2000}], device, precision, 256)
    assert isinstance(answer, str)  # generation stopped at the context's end


def test_interactive_chat_refuses_a_message_too_long_and_goes_on(tiny_chat, monkeypatch):
    model, tokenizer, device, precision = tiny_chat
    monkeypatch.setattr(chat_module, "generate_reply", lambda *args, stream, **kwargs: "ok")
    written = []
    inputs = iter(["hi", "word " * 5000, "still there?", "/exit"])
    chat_module.chat_loop(model, tokenizer, device, precision, read=lambda _: next(inputs), write=written.append)
    refusals = [w for w in written if "shorten it" in w]
    assert len(refusals) == 1 and written.count("model> ") == 2


def test_cli_chat_with_a_prompt_over_the_context_is_exit_2_in_seconds():
    from typer.testing import CliRunner
    from snugtune.cli import app
    started = time.perf_counter()
    result = CliRunner().invoke(app, ["chat", str(resolve_model("shape:tiny").path), "--prompt", "word " * 5000,
                                      "--device", "cpu"])
    assert result.exit_code == 2 and "shorten it" in result.output and "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if line.startswith("error:")]) == 1
    assert time.perf_counter() - started < 30
