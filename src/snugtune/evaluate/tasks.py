"""Evaluation of a run: held-out loss/perplexity, retention on general text, sample generations, HumanEval
pass@1 and, for preference data, preference accuracy and margin, each for the base model and the fine-tuned
one side by side. Results go to RUN_DIR/eval.json."""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path

import torch

from snugtune.config import DataConfig
from snugtune.errors import UserError
from snugtune.data.batches import eval_batches
from snugtune.data.preference_tokenize import TokenizedCompletion, TokenizedPair
from snugtune.data.prepare import prepare_data
from snugtune.data.tokenize import IGNORE
from snugtune.loss import mean_loss
from snugtune.objectives import training_objective
from snugtune.preference_loss import group_logps
from snugtune.rundir import EVAL, RunFolder, write_json_atomic
from snugtune.evaluate.run import LoadedRun, Trust, load_run

TASKS = ("perplexity", "retention", "generate", "humaneval", "preference")
DEFAULT_TASKS = {"sft": ("perplexity", "retention", "generate"), "dpo": ("preference", "retention", "generate"),
                 "orpo": ("preference", "retention", "generate"), "kto": ("preference", "retention", "generate")}


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


def evaluate_run(run_dir: str | Path, tasks: list[str] | None, data_file: str | None = None, limit: int | None = None,
                 device: str = "auto", progress=lambda message: None, trust: Trust = Trust()) -> dict:
    """Run the named tasks on RUN_DIR (None: DEFAULT_TASKS of its objective); returns {task: result} and merges
    it into RUN_DIR/eval.json.

    trust: the command line's settings (the run folder's own are ignored). With trust.unisolated_code,
    where this machine cannot isolate generated code, HumanEval runs it with only limits and the audit hook;
    where it can, the code is isolated regardless.
    """
    unknown = [t for t in tasks or () if t not in TASKS]
    if unknown:
        raise UserError(f"--task: unknown {unknown}; choose from {', '.join(TASKS)}")
    isolate = True
    if "humaneval" in (tasks or ()):
        from snugtune.evaluate.sandbox import isolation_problem, require_isolation
        isolate = isolation_problem() is None
        if not (isolate or trust.unisolated_code):
            require_isolation()  # refuse before loading any model
    run = load_run(run_dir, device, trust)
    cfg = run.config
    tasks = list(tasks or DEFAULT_TASKS[cfg.objective])
    results: dict = {}
    if "perplexity" in tasks:
        progress("perplexity: held-out loss, base vs tuned")
        if cfg.objective != "sft" and not data_file:
            raise UserError(f"{run_dir}: the run trained objective {cfg.objective} on preference data, which has no "
                            f"perplexity to measure: use --task preference, or pass --data a supervised data file")
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
    if "preference" in tasks:
        progress("preference: log-probabilities of held-out chosen and rejected answers, base vs tuned")
        results["preference"] = _preference(run, data_file)
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


def _preference_data(run: LoadedRun, data_file: str | None, objective: str):
    """Held-out preference examples: the run's held-out split, or every row of data_file, as `objective`
    reads them (pairs; kto: labelled completions)."""
    cfg = run.config
    if data_file:
        return prepare_data(DataConfig(path=data_file, eval_fraction=0.0), run.tokenizer, cfg.max_seq_len, 0,
                            objective=objective).train, data_file
    return (prepare_data(cfg.data, run.tokenizer, cfg.max_seq_len, cfg.train.seed, objective=objective).eval,
            f"{cfg.data.path} (held-out split)")


@torch.no_grad()
def _answer_logps(run: LoadedRun, model, batches: list[dict]) -> torch.Tensor:
    """[examples, answers]: each held-out example's summed answer log-probabilities (a pair: chosen,
    rejected; a labelled completion: its completion)."""
    found = []
    for batch in batches:
        batch = {k: v.to(run.device) for k, v in batch.items()}
        n = int(batch["examples"])
        answers = 1 if "desirable" in batch else 2
        with run.precision.autocast():
            sums = group_logps(model, batch, answers * n)[0].float()
        found.append(sums.view(answers, n).t())
    return torch.cat(found).cpu()


def _preference(run: LoadedRun, data_file: str | None) -> dict:
    """Base vs tuned on held-out preference data. Pairs: the share whose chosen answer the model gives more
    log-probability than the rejected one (accuracy) and the mean difference (margin, nats); and how many
    pairs the tuning moved toward the chosen answer (the tuned model's log-ratio to the base larger for the
    chosen answer: DPO's implicit-reward accuracy, the base as reference). Labelled completions (KTO): the
    mean log-probability of desirable and undesirable answers, and the share of rows the tuning moved the
    way their label says."""
    cfg = run.config
    objective = cfg.objective if cfg.objective != "sft" else "dpo"  # a supervised run: scored on --data pairs
    examples, source = _preference_data(run, data_file, objective)
    if not examples:
        raise UserError(f"{source}: no held-out preference examples to evaluate (set data.eval_fraction or pass --data)")
    t = training_objective(cfg.model_copy(update={"objective": objective}))
    batches = t.held_out_batches(examples, cfg.eval.batch_size, run.tokenizer.pad_token_id, 1, cfg.max_seq_len,
                                 cfg.micro_batch_tokens)
    with run.base_model() as base:
        before = _answer_logps(run, base, batches)
    after = _answer_logps(run, run.model, batches)
    if before.shape[1] == 2:
        margin = lambda logps: logps[:, 0] - logps[:, 1]  # noqa: E731
        moved = margin(after) - margin(before)
        return {"data": source, "pairs": len(examples),
                "base_accuracy": float((margin(before) > 0).float().mean()),
                "tuned_accuracy": float((margin(after) > 0).float().mean()),
                "base_margin": float(margin(before).mean()), "tuned_margin": float(margin(after).mean()),
                "reward_accuracy": float((moved > 0).float().mean()), "reward_margin": float(moved.mean())}
    desirable = torch.tensor([e.desirable for e in examples])
    mean = lambda logps, rows: float(logps[rows, 0].mean()) if rows.any() else float("nan")  # noqa: E731
    right_way = torch.where(desirable, after[:, 0] > before[:, 0], after[:, 0] < before[:, 0])
    return {"data": source, "rows": len(examples),
            "base_desirable_logp": mean(before, desirable), "tuned_desirable_logp": mean(after, desirable),
            "base_undesirable_logp": mean(before, ~desirable), "tuned_undesirable_logp": mean(after, ~desirable),
            "reward_accuracy": float(right_way.float().mean())}


def _prompts_and_references(run: LoadedRun, n: int) -> tuple[list[str], list[str]]:
    """The first n held-out prompts (the inference prompt: a sample's untrained prefix, a preference
    example's prompt) and their reference answers (a pair's chosen answer; a desirable completion)."""
    cfg = run.config
    held_out = prepare_data(cfg.data, run.tokenizer, cfg.max_seq_len, cfg.train.seed, objective=cfg.objective).eval
    prompts, references = [], []
    for example in held_out:
        if isinstance(example, TokenizedPair):
            prompt_ids, answer = example.prompt_ids, example.chosen_labels
        elif isinstance(example, TokenizedCompletion):
            if not example.desirable:
                continue
            prompt_ids, answer = example.prompt_ids, example.completion_labels
        else:
            first = next((i for i, label in enumerate(example.labels) if label != IGNORE), 0)
            if first == 0:
                continue  # plain text: no prompt to answer
            # the untrained prefix is exactly the inference prompt (tested in tests/test_tokenize.py)
            prompt_ids, answer = example.input_ids[:first], example.labels[first:]
        prompts.append(run.tokenizer.decode(prompt_ids))
        references.append(run.tokenizer.decode([t for t in answer if t != IGNORE], skip_special_tokens=True))
        if len(prompts) == n:
            break
    return prompts, references


def _sample_generations(run: LoadedRun, n: int) -> list[dict]:
    """Greedy answers of base and tuned model to the first n held-out prompts, beside the reference."""
    from snugtune.evaluate.generate import generate
    prompts, references = _prompts_and_references(run, n)
    if not prompts:
        return []
    with run.base_model() as base:
        base_out = generate(base, run.tokenizer, prompts, run.device, run.precision, max_new_tokens=160)
    tuned_out = generate(run.model, run.tokenizer, prompts, run.device, run.precision, max_new_tokens=160)
    return [{"prompt": p, "reference": r, "base": b, "tuned": t}
            for p, r, b, t in zip(prompts, references, base_out, tuned_out)]
