"""The `snugtune` command line. Exit codes: 0 done, 2 bad config or input, 3 does not fit, 130 interrupted."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fine-tune LLMs on the GPU you have.")
err = Console(stderr=True, soft_wrap=True)  # paths in messages stay on one line (copyable)
out = Console(soft_wrap=True)
# Trust settings for commands that open a run folder: from the command line only, never from the folder.
TRUST_REMOTE_CODE_HELP = "Let the base model's own Python code run (the run folder's config.yaml is not asked)."
PICKLE_HELP = "Load the base model's .bin/.pt (pickle) weights (the run folder's config.yaml is not asked)."


ERROR_LINE_CHARS = 1000  # an error is one line: a message quoting something huge is cut


def _fail(message: str, code: int = 2) -> None:
    from rich.markup import escape  # messages quote user values, which may contain [brackets]
    line = " ".join(message.splitlines())
    if len(line) > ERROR_LINE_CHARS:
        line = f"{line[:ERROR_LINE_CHARS]}... ({len(line):,} characters)"
    err.print(f"[bold red]error:[/] {escape(line)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _run(debug: bool, fn, *args, **kwargs):
    """Call fn, turning the errors users meet into one line and an exit code (traceback with --debug)."""
    from snugtune.errors import UserError
    from snugtune.errors import TrainingInterrupted
    from snugtune.errors import DoesNotFit
    try:
        return fn(*args, **kwargs)
    except UserError as exc:
        if debug:
            raise
        _fail(str(exc), 2)
    except DoesNotFit as exc:
        from rich.markup import escape
        err.print(f"[bold red]does not fit:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(3)
    except TrainingInterrupted as exc:
        err.print(f"[yellow]{exc}[/]")
        raise typer.Exit(130)
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]")
        raise typer.Exit(130)
    except RuntimeError as exc:
        if _from_ctrl_c(exc):
            err.print("[yellow]interrupted[/]")
            raise typer.Exit(130)
        if debug or not _out_of_memory(exc):
            raise
        from rich.markup import escape
        err.print(f"[bold red]out of memory:[/] {escape(str(exc).splitlines()[0])}; `snugtune plan` shows what "
                  f"fits (lower eval.batch_size, max_seq_len or --max-new-tokens)", highlight=False, soft_wrap=True)
        raise typer.Exit(3)
    except OSError as exc:
        if debug:
            raise
        _fail(f"{getattr(exc, 'filename', None) or ''}: {exc.strerror or exc}".lstrip(": "), 2)


def _from_ctrl_c(exc: BaseException) -> bool:
    """A Ctrl-C that Python re-raised as another error: CPython 3.11 wraps one that lands while a class is made
    (an import's dataclass) in RuntimeError("Error calling __set_name__ ...")."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def _out_of_memory(exc: BaseException) -> bool:
    torch = sys.modules.get("torch")  # loaded by whatever ran out of memory
    return torch is not None and isinstance(exc, torch.OutOfMemoryError)


def _train_or_plan(cfg, **kwargs) -> dict:
    """Training; out of memory outside the step loop (which re-plans itself) is DoesNotFit with the plan."""
    from snugtune.engine.train import train as run_training
    from snugtune.errors import DoesNotFit
    from snugtune.planner.choose import plan_config
    try:
        return run_training(cfg, **kwargs)
    except RuntimeError as exc:
        if not _out_of_memory(exc):
            raise
        plan = plan_config(cfg)
        raise DoesNotFit(f"ran out of GPU memory outside the training steps ({str(exc).splitlines()[0]}); the plan "
                         f"for this config predicts {plan.peak_bytes / 2**30:.1f} GiB of {plan.budget_bytes / 2**30:.1f}"
                         f" GiB ({plan.card}): lower max_seq_len, eval.batch_size or budget (see `snugtune plan`)") from None


@app.command()
def train(
    config: Path = typer.Argument(..., help="Config YAML (see examples/)."),
    overrides: Optional[list[str]] = typer.Argument(None, help="key=value overrides, e.g. train.lr=1e-4 lora.r=8"),
    fresh: bool = typer.Option(False, "--fresh", help="Start over: rename the existing run to OUTPUT_DIR.old-N first "
                               "(only a snugtune run is ever moved; any other folder is refused)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    accept_new_data: bool = typer.Option(False, "--accept-new-data", help="Resume even though the data file's "
                                         "content changed since the checkpoint (recorded in summary.json)."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Fine-tune. Resumes when the output directory has a checkpoint (--fresh starts over)."""
    from rich.markup import escape
    from snugtune.config import load_config
    from snugtune.rundir import set_aside_run
    from snugtune.trackers import check_installed

    cfg = _run(debug, load_config, config, overrides or [])  # before torch loads: a bad config fails at once
    from snugtune.engine import distributed
    ctx = distributed.context_from_env()  # torchrun / accelerate launch set RANK and WORLD_SIZE
    _run(debug, check_installed, cfg)  # a missing extra stops here, before anything is built or written
    if fresh and ctx.is_main:
        moved = _run(debug, set_aside_run, Path(cfg.output_dir))
        if moved:
            err.print(f"moved the previous run to {moved}", highlight=False, markup=False)
    from snugtune.engine.signals import StopRequests
    stop = StopRequests()  # from here a signal is recorded, even one a library swallows while it imports
    try:
        with stop.installed():
            if ctx.is_main:
                out.print(f"snugtune: training [bold]{escape(cfg.model)}[/] ({cfg.method}) -> "
                          f"{escape(cfg.output_dir)}" + (f" on {ctx.world_size} processes" if ctx.enabled else ""),
                          highlight=False)
            summary = _run(debug, _train_or_plan, cfg, show_progress=not quiet,
                           notify=lambda message: err.print(message, highlight=False), ctx=ctx,
                           accept_new_data=accept_new_data, stop=stop)
    finally:
        distributed.stop(ctx)
    if ctx.is_main:
        _print_summary(summary, Path(cfg.output_dir))


def _print_summary(summary: dict, run_dir: Path) -> None:
    before, after = summary["eval_loss_before"], summary["eval_loss_after"]
    objective = summary.get("objective", "sft")
    unit = {"sft": "tokens", "kto": "rows"}.get(objective, "pairs")
    out.print(f"held-out {'' if objective == 'sft' else objective.upper() + ' '}loss: {before:.4f} before -> "
              f"{after:.4f} after ({summary['eval_tokens']} {unit})", highlight=False)
    metrics = summary.get("eval_metrics_after") or {}
    if "rewards/margins" in metrics:
        accuracy = f"accuracy {metrics['rewards/accuracies']:.1%}, " if "rewards/accuracies" in metrics else ""
        out.print(f"held-out rewards: {accuracy}margin {metrics['rewards/margins']:.4f} (chosen "
                  f"{metrics['rewards/chosen']:.4f}, rejected {metrics['rewards/rejected']:.4f})", highlight=False)
    run_seconds, this_seconds = summary.get("run_wall_seconds", summary["wall_seconds"]), summary["wall_seconds"]
    timing = f"{run_seconds:.0f}s" + (f" over every invocation (this one {this_seconds:.0f}s)"
                                      if summary.get("resumed_from") else "")
    out.print(f"steps {summary['steps']}, {summary['tokens_trained']:,} tokens in {timing}, "
              f"peak memory {summary['peak_memory_bytes'] / 2**30:.2f} GiB ({summary['peak_memory_kind']})",
              highlight=False)
    out.print(f"run directory: [bold]{run_dir.resolve()}[/]", highlight=False)


@app.command()
def plan(
    config: Path = typer.Argument(..., help="Config YAML."),
    overrides: Optional[list[str]] = typer.Argument(None, help="key=value overrides."),
    gpu: Optional[str] = typer.Option(None, "--gpu", help="Card (t4, rtx3080, l4, a10, rtx4090, a100-40, "
                                      "a100-80, h100, h200) or a size like 10GiB; default: the config's budget."),
    gpus: int = typer.Option(1, "--gpus", min=1, max=4096, help="Processes (GPUs) under torchrun: DDP, or FSDP "
                                                                "sharding."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Predicted peak GPU memory by component and the fastest settings that fit (exit 3 if none)."""
    from snugtune.config import load_config
    from snugtune.planner.choose import plan_config
    from snugtune.planner.explain import format_plan
    cfg = _run(debug, load_config, config, overrides or [])
    result = _run(debug, plan_config, cfg, gpu, None, gpus)
    if as_json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print(format_plan(result))
    if not result.fits:
        raise typer.Exit(3)


@app.command()
def data(
    config: Path = typer.Argument(..., help="Config YAML."),
    overrides: Optional[list[str]] = typer.Argument(None, help="key=value overrides."),
    show: int = typer.Option(0, "--show", min=0, help="Print N rendered samples with trained tokens marked (preference "
                             "data: each pair's prompt, then its chosen and rejected answers, scored tokens marked)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Detected format, row counts, drops and token lengths; optionally rendered samples."""
    from snugtune.config import load_config
    from snugtune.data.prepare import prepare_data
    from snugtune.data.prep_report import report_lines
    from snugtune.models.cache import default_cache_dir
    from snugtune.models.load import load_tokenizer
    from snugtune.models.resolve import resolve_model

    cfg = _run(debug, load_config, config, overrides or [])
    resolved = _run(debug, resolve_model, cfg.model, allow_pickle=cfg.allow_pickle_weights)
    tokenizer = _run(debug, load_tokenizer, resolved.path, cfg.trust_remote_code)
    prepared = _run(debug, prepare_data, cfg.data, tokenizer, cfg.max_seq_len, cfg.train.seed,
                    cache_dir=default_cache_dir() / "data", objective=cfg.objective)
    report = prepared.report
    lengths = sorted(s.length for s in prepared.train + prepared.eval)
    pct = {p: lengths[min(len(lengths) - 1, int(p / 100 * len(lengths)))] for p in (50, 90, 99, 100)}
    if as_json:
        print(json.dumps({**report.__dict__, "token_length_percentiles": pct}, indent=2))
        return
    for line in report_lines(report):
        out.print(line, highlight=False, markup=False)
    out.print("token lengths: " + ", ".join(f"p{p} {v}" for p, v in pct.items()), highlight=False)
    for example in prepared.train[:show]:
        out.rule()
        _print_example(example, tokenizer)


@app.command("eval")
def eval_command(
    run_dir: Path = typer.Argument(..., help="A finished run directory."),
    task: Optional[str] = typer.Option(None, "--task", help="Comma-separated: perplexity, retention, generate, "
                                       "humaneval, preference. Default: perplexity,retention,generate; a preference "
                                       "run's: preference,retention,generate."),
    data_file: Optional[str] = typer.Option(None, "--data", help="Score this file instead of the held-out split."),
    limit: Optional[int] = typer.Option(None, "--limit", help="HumanEval: first N problems; generate: N prompts."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_REMOTE_CODE_HELP),
    pickle_weights: bool = typer.Option(False, "--allow-pickle-weights", help=PICKLE_HELP),
    unisolated: bool = typer.Option(False, "--allow-unisolated-code",
                                    help="HumanEval where this machine cannot isolate generated code (no user "
                                         "namespaces): run it anyway with only resource limits and a Python audit "
                                         "hook. That is no security boundary at all: known bypasses let the code "
                                         "read and write your files, use the network and start processes "
                                         "(docs/evaluation.md)."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Base model and fine-tuned model side by side: loss/perplexity, retention, generations, HumanEval."""
    from snugtune.evaluate.run import Trust
    from snugtune.evaluate.tasks import evaluate_run
    tasks = [t.strip() for t in task.split(",") if t.strip()] if task else None
    data_file = data_file and str(Path(data_file).expanduser())  # a quoted ~ means the home folder too
    results = _run(debug, evaluate_run, run_dir.expanduser(), tasks, data_file, limit, device,
                   progress=lambda message: err.print(f"[dim]{message}[/]", highlight=False),
                   trust=Trust(remote_code, pickle_weights, unisolated))
    if as_json:
        print(json.dumps(results, indent=2))
        return
    _print_eval(results)


def _sandbox_note(sandbox: dict | None) -> str:
    """How HumanEval's programs were confined, and the limits this machine could not enforce."""
    if sandbox is None:  # results written before the sandbox reported its limits
        return "sandboxed"
    missing = [m.split(" (")[0] for m in sandbox["not_enforced"]]
    ran = "run WITHOUT isolation" if sandbox["isolation"] == "none" else "sandboxed"
    return f"{ran}; " + (f"not enforced here: {', '.join(missing)}" if missing else "every sandbox limit enforced")


def _print_eval(results: dict) -> None:
    from rich.table import Table
    table = Table(title="evaluation: base vs fine-tuned")
    for column in ("task", "base", "fine-tuned", "note"):
        table.add_column(column)
    if "perplexity" in results:
        r = results["perplexity"]
        table.add_row("held-out loss", f"{r['base_loss']:.4f}", f"{r['tuned_loss']:.4f}",
                      f"perplexity {r['base_perplexity']:.2f} -> {r['tuned_perplexity']:.2f}, {r['tokens']} tokens")
    if "retention" in results:
        r = results["retention"]
        table.add_row("general-text loss", f"{r['base_loss']:.4f}", f"{r['tuned_loss']:.4f}",
                      f"retention {r['kept_percent']:.1f}% ({r['data']})")
    if "preference" in results and "pairs" in results["preference"]:
        r = results["preference"]
        table.add_row("preference accuracy", f"{r['base_accuracy']:.1%}", f"{r['tuned_accuracy']:.1%}",
                      f"margin {r['base_margin']:.3f} -> {r['tuned_margin']:.3f} nats; moved toward chosen: "
                      f"{r['reward_accuracy']:.1%}, {r['pairs']} pairs")
    elif "preference" in results:
        r = results["preference"]
        table.add_row("desirable - undesirable log-prob",
                      f"{r['base_desirable_logp'] - r['base_undesirable_logp']:.3f}",
                      f"{r['tuned_desirable_logp'] - r['tuned_undesirable_logp']:.3f}",
                      f"moved the labelled way: {r['reward_accuracy']:.1%}, {r['rows']} rows")
    if "humaneval" in results:
        r = results["humaneval"]
        table.add_row("HumanEval pass@1", f"{r['base_pass@1']:.1%}", f"{r['tuned_pass@1']:.1%}",
                      f"{r['problems']} problems, {_sandbox_note(r.get('sandbox'))}")
    if table.row_count:  # --task generate alone has no scores
        out.print(table)
    from rich.markup import escape
    for sample in results.get("generate", []):
        out.rule()
        for label, text in (("prompt", sample["prompt"][-300:]), ("base", sample["base"][:400]),
                            ("tuned", sample["tuned"][:400]), ("reference", sample["reference"][:400])):
            out.print(f"[bold]{label}[/]:\n{escape(text)}", highlight=False)


@app.command()
def report(
    run_dirs: list[Path] = typer.Argument(..., help="One or more run directories."),
    out_dir: Path = typer.Option(Path("report"), "--out", help="Folder for report.md and loss_curves.png."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """The results table (Markdown) and the loss curves of the runs (PNG)."""
    from snugtune.evaluate.results_table import build_report
    markdown, plot = _run(debug, build_report, [d.expanduser() for d in run_dirs], out_dir.expanduser())
    print(markdown.read_text())
    out.print(f"wrote {markdown} and {plot}", highlight=False)


@app.command()
def merge(
    run_dir: Path = typer.Argument(..., help="A finished run directory."),
    out_dir: Path = typer.Option(..., "--out", help="Folder for the merged Hugging Face model."),
    dtype: str = typer.Option("bf16", "--dtype", help="bf16, fp16 or fp32."),
    gguf: bool = typer.Option(False, "--gguf", help="Also write a GGUF file (llama.cpp / Ollama / LM Studio)."),
    gguf_type: str = typer.Option("f16", "--gguf-type", help="f16, q8_0, or by llama.cpp's quantizer (the "
                                  "gguf-quant extra): q4_k_m, q5_k_m, q6_k, q4_0."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Merge the adapter into a 16-bit copy of the base (streamed, never into 4-bit weights); optionally GGUF
    with an Ollama Modelfile beside it."""
    from snugtune.export import targets
    request = targets.ExportRequest(run_dir.expanduser(), out_dir.expanduser(), dtype, gguf, gguf_type)
    wanted = _run(debug, targets.check_all, request)  # every check first: a missing extra fails in a second
    written: dict[str, Path] = {}
    for name, target in wanted.items():
        written[name] = _run(debug, targets.write, name, request, written)
        err.print(_run(debug, target.describe, written[name]), highlight=False, markup=False)


@app.command()
def chat(
    path: Path = typer.Argument(..., help="A run directory or a merged model folder."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="One message, print the answer and exit."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1, max=1_000_000,
                                       help="Longest answer in tokens (less where the model's context ends)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_REMOTE_CODE_HELP),
    pickle_weights: bool = typer.Option(False, "--allow-pickle-weights", help=PICKLE_HELP),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Chat with the fine-tuned model (chat template, streamed, multi-turn; /reset, /exit)."""
    from snugtune.chat import chat_loop, load_for_chat, reply
    from snugtune.evaluate.run import Trust
    model, tokenizer, dev, precision = _run(debug, load_for_chat, path, device, Trust(remote_code, pickle_weights))

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()
    if prompt is not None:
        _run(debug, reply, model, tokenizer, [{"role": "user", "content": prompt}], dev, precision, max_new_tokens,
             stream=write, notify=lambda message: err.print(message, highlight=False, markup=False))
        write("\n")
        return
    _run(debug, chat_loop, model, tokenizer, dev, precision, read=input, write=write, max_new_tokens=max_new_tokens)


@app.command()
def bench(
    shape: str = typer.Option("llama3-8b", "--shape", help="Registry shape (random weights)."),
    seq: int = typer.Option(2048, "--seq", help="Tokens per row (packed)."),
    batch: int = typer.Option(1, "--batch", help="Rows per micro-batch."),
    steps: int = typer.Option(8, "--steps", help="Optimizer steps per stack (the first 3 are warm-up)."),
    cap: Optional[float] = typer.Option(None, "--cap", help="Cap GPU memory at this many GiB (both stacks)."),
    against: Optional[str] = typer.Option(None, "--against", help="Comma-separated: plain, unsloth (when installed); "
                                          "under --objective dpo: trl, unsloth; empty: none. Default: plain (dpo: trl)."),
    objective: str = typer.Option("sft", "--objective", help="sft, or dpo: pairs whose every sequence is --seq tokens "
                                  "(--batch pairs a micro-batch), beside TRL's and Unsloth's DPO."),
    max_context: Optional[int] = typer.Option(None, "--max-context", help="Also find each stack's longest single "
                                              "sequence that trains under --cap, up to this many tokens."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="Run a config file's settings (e.g. a shipped "
                                          "example) on --shape and the bench's rows; --seq/--batch/--cap are then its."),
    set_: list[str] = typer.Option([], "--set", help="key=value override of the benched config (repeatable)."),
    one_document: bool = typer.Option(False, "--one-document", help="Rows of one long document each (standard-"
                                      "library code, no packing) instead of packed samples."),
    emulate: Optional[str] = typer.Option(None, "--emulate", help="Run every stack as this card would (t4: fp16 "
                                          "with loss scaling, its attention kernels, its 15 GiB and, for snugtune, "
                                          "its plan)."),
    out_json: Optional[Path] = typer.Option(None, "--json", help="Also write the results to this file."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Speed and memory of snugtune beside the plain transformers+peft+bitsandbytes recipe, same run."""
    from snugtune.bench.compare import check_json_target, format_table, run_bench
    from snugtune.rundir import write_text_atomic
    if objective not in ("sft", "dpo"):
        _fail(f"--objective: {objective} is not benched (sft, dpo)")
    # None: the objective's default stack; an empty --against (or ",") benches snugtune alone
    stacks = None if against is None else tuple(s.strip() for s in against.split(",") if s.strip())
    if out_json:
        _run(debug, check_json_target, out_json)
    results = _run(debug, run_bench, shape, seq, batch, steps, stacks, cap, device, max_context, recipe,
                   tuple(set_), one_document, emulate, objective)
    print(format_table(results))
    if out_json:
        _run(debug, write_text_atomic, out_json, json.dumps(results, indent=2))


def _print_example(example, tokenizer) -> None:
    """A sample with its trained tokens marked; a preference pair as its prompt, then its chosen and rejected
    answers (a KTO row: its completion and label), each with its scored tokens marked."""
    from snugtune.data.preference_tokenize import TokenizedCompletion, TokenizedPair
    if isinstance(example, TokenizedPair):
        answers = [("chosen", example.chosen_ids, example.chosen_labels),
                   ("rejected", example.rejected_ids, example.rejected_labels)]
    elif isinstance(example, TokenizedCompletion):
        label = "desirable" if example.desirable else "undesirable"
        answers = [(f"completion ({label})", example.completion_ids, example.completion_labels)]
    else:
        _print_marked(example.input_ids, example.labels, tokenizer)
        return
    tty = sys.stdout.isatty()
    heading = lambda name: out.print(f"[bold]{name}:[/]" if tty else f"{name}:", markup=tty, highlight=False)  # noqa: E731
    heading("prompt")
    out.print(tokenizer.decode(example.prompt_ids), markup=False, highlight=False)
    for name, ids, labels in answers:
        heading(name)
        _print_marked(ids, labels, tokenizer)


def _print_marked(input_ids: list[int], labels: list[int], tokenizer) -> None:
    """Trained tokens in green on a terminal, between [[ and ]] in plain text."""
    from snugtune.data.tokenize import IGNORE
    spans: list[tuple[bool, list[int]]] = []
    for tok, lab in zip(input_ids, labels):
        trained = lab != IGNORE
        if spans and spans[-1][0] == trained:
            spans[-1][1].append(tok)
        else:
            spans.append((trained, [tok]))
    tty = sys.stdout.isatty()
    for trained, ids in spans:
        text = tokenizer.decode(ids)
        if trained:
            out.print(f"[green]{text}[/]" if tty else f"[[{text}]]", end="", markup=tty, highlight=False)
        else:
            out.print(text, end="", markup=False, highlight=False)
    out.print()


def _quiet_libraries() -> None:
    """Our own progress bar and messages replace the libraries' load bars and info logs."""
    import logging
    import warnings
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*MatMul8bitLt: inputs will be cast.*")


def main() -> None:
    # Expandable segments keep the caching allocator from fragmenting when sequence lengths vary (packed
    # rows, ragged batches): reserved memory then stays close to allocated. Set before CUDA starts.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    try:
        _quiet_libraries()
        app()
    except (KeyboardInterrupt, RuntimeError) as exc:  # Ctrl-C while the libraries load, before a command has it
        if not _from_ctrl_c(exc):
            raise
        err.print("[yellow]interrupted[/]")
        _exit_interrupted()
    except SystemExit as exc:
        if exc.code == 130:
            _exit_interrupted()
        raise


def _exit_interrupted() -> None:
    # CPython 3.11 remembers a KeyboardInterrupt that passed through exec() (dataclasses run exec while a
    # library imports) and, under `python -m`, ends the process by SIGINT even though it was caught: exit now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)


if __name__ == "__main__":
    main()
