"""Evaluation of a run: held-out loss/perplexity, retention on general text, sample generations and
HumanEval pass@1, each for the base model and the fine-tuned one side by side. Results go to RUN_DIR/eval.json."""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path

from snugtune.config import DataConfig
from snugtune.errors import UserError
from snugtune.data.batches import eval_batches
from snugtune.data.prepare import prepare_data
from snugtune.loss import mean_loss
from snugtune.rundir import EVAL, RunFolder, write_json_atomic
from snugtune.evaluate.run import LoadedRun, Trust, load_run

TASKS = ("perplexity", "retention", "generate", "humaneval")


def retention_text_path() -> Path:
    return Path(str(resources.files("snugtune") / "bundled" / "retention_docs.jsonl"))


def _loss_pair(run: LoadedRun, samples) -> dict:
    batches = eval_batches(samples, run.config.eval.batch_size, run.tokenizer.pad_token_id,
                           max_len=run.config.max_seq_len, max_tokens=run.config.micro_batch_tokens)
    with run.base_model() as base:
        before, tokens = mean_loss(base, batches, run.precision, run.device)
    after, _ = mean_loss(run.model, batches, run.precision, run.device)
    return {"base_loss": before, "tuned_loss": after, "base_perplexity": math.exp(before),
            "tuned_perplexity": math.exp(after), "tokens": tokens}


def evaluate_run(run_dir: str | Path, tasks: list[str], data_file: str | None = None, limit: int | None = None,
                 device: str = "auto", progress=lambda message: None, trust: Trust = Trust()) -> dict:
    """Run the named tasks on RUN_DIR; returns {task: result} and merges it into RUN_DIR/eval.json.

    trust: the command line's settings (the run folder's own are ignored). With trust.unisolated_code,
    where this machine cannot isolate generated code, HumanEval runs it with only limits and the audit hook;
    where it can, the code is isolated regardless.
    """
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise UserError(f"--task: unknown {unknown}; choose from {', '.join(TASKS)}")
    isolate = True
    if "humaneval" in tasks:
        from snugtune.evaluate.sandbox import isolation_problem, require_isolation
        isolate = isolation_problem() is None
        if not (isolate or trust.unisolated_code):
            require_isolation()  # refuse before loading any model
    run = load_run(run_dir, device, trust)
    cfg = run.config
    results: dict = {}
    if "perplexity" in tasks:
        progress("perplexity: held-out loss, base vs tuned")
        if data_file:
            data = prepare_data(DataConfig(path=data_file, eval_fraction=0.0), run.tokenizer, cfg.max_seq_len, 0)
            samples, source = data.train, data_file
        else:
            data = prepare_data(cfg.data, run.tokenizer, cfg.max_seq_len, cfg.train.seed)
            samples, source = data.eval, f"{cfg.data.path} (held-out split)"
        if not samples:
            raise UserError(f"{source}: no held-out samples to evaluate (set data.eval_fraction or pass --data)")
        results["perplexity"] = {"data": source, "samples": len(samples), **_loss_pair(run, samples)}
    if "retention" in tasks:
        progress("retention: loss on general text the run did not train on")
        docs = prepare_data(DataConfig(path=str(retention_text_path()), format="text", eval_fraction=0.0),
                            run.tokenizer, cfg.max_seq_len, 0).train
        pair = _loss_pair(run, docs)
        # perplexity ratio: 100% = the base model's ability on this text is fully kept
        results["retention"] = {"data": "bundled stdlib module docstrings", "samples": len(docs), **pair,
                                "kept_percent": 100.0 * math.exp(pair["base_loss"] - pair["tuned_loss"])}
    if "generate" in tasks:
        progress("generate: greedy answers to held-out prompts")
        results["generate"] = _sample_generations(run, n=limit or 3)
    if "humaneval" in tasks:
        from snugtune.evaluate.humaneval import humaneval
        progress("humaneval: generating and executing completions in the sandbox (base, then tuned)")
        with run.base_model() as base:
            before = humaneval(base, run.tokenizer, run.device, run.precision, limit, isolate=isolate)
        after = humaneval(run.model, run.tokenizer, run.device, run.precision, limit, isolate=isolate)
        results["humaneval"] = {"problems": after["problems"], "mode": after["mode"], "base_pass@1": before["pass@1"],
                                "tuned_pass@1": after["pass@1"], "base_passed": before["passed"],
                                "tuned_passed": after["passed"], "sandbox": after["sandbox"],
                                "base_results": before["results"],
                                "tuned_results": after["results"]}
    path = Path(run_dir) / EVAL
    merged = RunFolder(Path(run_dir)).evals()
    merged.update(results)
    write_json_atomic(path, merged)
    return results


def _sample_generations(run: LoadedRun, n: int) -> list[dict]:
    """Greedy answers of base and tuned model to the first n held-out prompts, beside the reference."""
    from snugtune.data.tokenize import IGNORE
    from snugtune.evaluate.generate import generate
    cfg = run.config
    held_out = prepare_data(cfg.data, run.tokenizer, cfg.max_seq_len, cfg.train.seed).eval
    prompts, references = [], []
    for sample in held_out:
        first = next((i for i, label in enumerate(sample.labels) if label != IGNORE), 0)
        if first == 0:
            continue  # plain text: no prompt to answer
        # the untrained prefix is exactly the inference prompt (tested in tests/test_tokenize.py)
        prompts.append(run.tokenizer.decode(sample.input_ids[:first]))
        references.append(run.tokenizer.decode([t for t in sample.labels[first:] if t != IGNORE],
                                               skip_special_tokens=True))
        if len(prompts) == n:
            break
    if not prompts:
        return []
    with run.base_model() as base:
        base_out = generate(base, run.tokenizer, prompts, run.device, run.precision, max_new_tokens=160)
    tuned_out = generate(run.model, run.tokenizer, prompts, run.device, run.precision, max_new_tokens=160)
    return [{"prompt": p, "reference": r, "base": b, "tuned": t}
            for p, r, b, t in zip(prompts, references, base_out, tuned_out)]
