"""The two-GPU measurements of docs/distributed.md (issue 37), on one host with two GPUs, one group a call:

    export PYTHONPATH=$PWD/.devsite:$PWD/src NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \\
           NVSHMEM_DISABLE_NVLS=1
    python3 measure/two_gpu_runs.py $OUT --group tinyllama [--budget-s 540]     # then 8b, t4, fsdp-memory
    python3 measure/two_gpu_runs.py $OUT --group all --budget-s 540             # as far as one call gets

Groups (each fits one 10-minute call; stages in a group run in order, jobs of a stage side by side, one GPU
each, and stages that would start after --budget-s are skipped and listed):
- tinyllama: the TinyLlama shape (LoRA, 4 rows a step, fast path) on 1 GPU, with and without CUDA graphs;
  DDP on 2 GPUs (the same 4 rows a step); its step-10 checkpoint resumed on 1 GPU; the 1-GPU step-10
  checkpoint resumed on 2; two single-GPU "nodes" (`torchrun --nnodes 2 --rdzv-backend c10d`).
- 8b: the Llama-3.1-8B shape (QLoRA, 4 rows a step) on 1 GPU, under DDP and under FSDP on 2, the FSDP
  step-10 checkpoint resumed on 1 GPU.
- t4: examples/llama3-8b_qlora_2xt4.yaml as shipped, in fp16 under a 15 GiB cap per GPU (budget: t4):
  DDP on 2 GPUs (16 rows a step on each), FSDP on 2, and 1 GPU with 32 rows a step (the same batch).
- fsdp-memory: FSDP on 2 GPUs at other models and lengths (TinyLlama shape QLoRA 2,048; the 8B shape at
  4,096; the Qwen2.5-7B shape at 2,048), 10 steps each, for the planner's FSDP memory.
Each training job has its `snugtune plan --json` beside it (the same overrides, `--gpus` its processes,
`--gpu` this GPU's size or the t4 budget). OUT/two_gpu_GROUP.json has, per run, the loss and grad norm per
step, tokens/s (median step after the third; per GPU and in all), rank 0's peak memory (reserved, allocated)
and the planned figures, every GPU's peak memory in use (nvidia-smi) per stage, and the comparisons the
issue's targets read: 2-GPU tokens/s over 1 GPU's, loss-curve gaps, planned over measured peak. It is
rewritten after every stage. Run folders go to a new runs/two-gpu-GROUP-TIME (or --work); OUT/logs gets
each job's log, metrics.jsonl and summary.json. Every job gets OMP_NUM_THREADS = cores / 2 (torchrun sets
1, and FSDP quantizes the 8B on the host in each process).

--cpu-check runs a group's plumbing on the CPU (gloo, tiny shapes of the same families, 256-token rows).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "src" / "snugtune" / "bundled" / "stdlib_functions.jsonl"
RECIPE = REPO / "examples" / "llama3-8b_qlora_2xt4.yaml"
STEPS, SAVE_AT = 20, 10
CUDA_CONTEXT_GIB = 0.67  # memory_rules.CUDA_CONTEXT_BYTES: outside torch's allocator, inside the planner's peak
# NVLink multicast stays off on the lent machines (set by the caller too; these are the defaults)
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
# the comparison runs: checkpointing every block, micro-batch 2, no dropout, 4 rows a step, so 1- and 2-GPU
# curves compare and memory differs only by what FSDP shards
COMMON = [f"data.path={DATA}", f"train.max_steps={STEPS}", f"save.every_steps={SAVE_AT}", "lora.dropout=0",
          "train.micro_batch=2", "train.rows_per_step=null", "train.grad_checkpointing=true", "budget=auto",
          "eval.max_batches=2"]
# the recipe as shipped, but a few steps on the bundled data and no checkpoint (fp16 as on T4s: GPU only)
T4 = [f"data.path={DATA}", "train.max_steps=12", "save.every_steps=1000", "eval.max_batches=2"]
SHAPES = {"tinyllama": ["model=shape:tinyllama-1.1b", "method=lora"], "8b": ["model=shape:llama3-8b"],
          "qwen7b": ["model=shape:qwen2.5-7b"]}
CPU_SHAPES = {"tinyllama": ["model=shape:tiny-tinyllama-1.1b", "method=lora"],
              "8b": ["model=shape:tiny-llama3-8b"], "qwen7b": ["model=shape:tiny-qwen2.5-7b"]}
CPU = ["device=cpu", "max_seq_len=256"]
GPU_FP16 = ["train.precision=fp16"]


@dataclass
class Job:
    """One command of a stage: a training run (writing `run`, with `processes` processes) or a plan."""
    command: list[str]
    gpus: str                      # CUDA_VISIBLE_DEVICES
    run: Path | None = None
    processes: int = 1
    env: dict = field(default_factory=dict)


@dataclass
class Setup:
    """What the commands of a group are built from: the work folder, the card to plan for, the shapes, the
    overrides of a --cpu-check (else none) and those that only a GPU takes (none under --cpu-check)."""
    work: Path
    card: str
    shapes: dict
    cpu: list
    gpu_only: list


def train_command(s: Setup, overrides: list[str], processes: int, run: Path, port: int = 29500,
                  config: Path = RECIPE) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
                "--master-port", str(port)] if processes > 1 else [sys.executable]
    return [*launcher, "-m", "snugtune", "train", str(config), *overrides, *s.cpu, f"output_dir={run}", "--quiet"]


def plan_command(s: Setup, overrides: list[str], processes: int, card: str | None = None) -> list[str]:
    return [sys.executable, "-m", "snugtune", "plan", str(RECIPE), *overrides, *s.cpu, "--gpus", str(processes),
            "--gpu", card or s.card, "--json"]


def compared(s: Setup, shape: str, processes: int, *more: str) -> list[str]:
    """The comparison runs' overrides: 4 rows a step whatever the process count."""
    return [*COMMON, *s.shapes[shape], f"train.grad_accum={2 // processes}", *more]


def trained(s: Setup, name: str, overrides: list[str], processes: int, gpus: str, port: int = 29500,
            card: str | None = None) -> dict[str, Job]:
    """A training run in s.work/name, and its plan beside it where `card` is given ('' for this GPU)."""
    jobs = {name: Job(train_command(s, overrides, processes, s.work / name, port), gpus, s.work / name, processes)}
    if card is not None:
        jobs[f"plan_{name}"] = Job(plan_command(s, overrides, processes, card or None), "")
    return jobs


def two_nodes(s: Setup, overrides: list[str], name: str, port: int) -> dict[str, Job]:
    """One job of two torchrun agents (`--nnodes 2`, one process each, c10d rendezvous on this host), each
    seeing one GPU, as two machines would: LOCAL_RANK 0 in both, global rank 0 writes."""
    run = s.work / name
    agent = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
             "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", name]
    command = [*agent, "-m", "snugtune", "train", str(RECIPE), *overrides, *s.cpu, f"output_dir={run}", "--quiet"]
    return {f"{name}_node_a": Job(command, "0", run, 2), f"{name}_node_b": Job(command, "1")}


def resumed(s: Setup, source: str, name: str, overrides: list[str], processes: int, gpus: str,
            port: int = 29500) -> dict[str, Job]:
    """A copy of run `source` as if stopped after step SAVE_AT, trained on by `processes` (made when its stage
    starts; no job where the source has no such checkpoint)."""
    if not (s.work / source / "checkpoints" / f"step-{SAVE_AT}").is_dir():
        return {}
    shutil.copytree(s.work / source, s.work / name, ignore=shutil.ignore_patterns(f"step-{STEPS}", "summary.json"))
    return trained(s, name, overrides, processes, gpus, port)


def tinyllama_stages(s: Setup) -> list[tuple[str, object]]:
    one, ddp = compared(s, "tinyllama", 1), compared(s, "tinyllama", 2, "train.data_parallel=ddp")
    return [
        ("one_gpu", lambda: {**trained(s, "tinyllama_1gpu", one, 1, "0", card=""),
                             **trained(s, "tinyllama_1gpu_no_graphs", [*one, "train.cuda_graphs=false"], 1, "1")}),
        ("ddp", lambda: trained(s, "tinyllama_ddp_2gpu", ddp, 2, "0,1", 29511, card="")),
        ("resume_2_on_1", lambda: resumed(s, "tinyllama_ddp_2gpu", "tinyllama_ddp_resumed_1gpu", one, 1, "0")),
        ("resume_1_on_2", lambda: resumed(s, "tinyllama_1gpu", "tinyllama_1gpu_resumed_2gpu", ddp, 2, "0,1", 29512)),
        ("two_nodes", lambda: two_nodes(s, ddp, "tinyllama_2nodes", 29513)),
    ]


def eight_b_stages(s: Setup) -> list[tuple[str, object]]:
    one = compared(s, "8b", 1)
    return [
        ("one_gpu", lambda: trained(s, "8b_1gpu", one, 1, "0", card="")),
        ("ddp", lambda: trained(s, "8b_ddp_2gpu", compared(s, "8b", 2, "train.data_parallel=ddp"), 2, "0,1", 29521,
                                card="")),
        ("fsdp", lambda: trained(s, "8b_fsdp_2gpu", compared(s, "8b", 2, "train.data_parallel=fsdp"), 2, "0,1",
                                 29522, card="")),
        ("resume_2_on_1", lambda: resumed(s, "8b_fsdp_2gpu", "8b_fsdp_resumed_1gpu", one, 1, "0")),
    ]


def t4_stages(s: Setup) -> list[tuple[str, object]]:
    t4 = [*T4, *s.shapes["8b"], *s.gpu_only]
    return [
        ("ddp", lambda: trained(s, "t4_ddp_2gpu", t4, 2, "0,1", 29531, card="t4")),
        # one card with both cards' rows of a step
        ("one_gpu", lambda: trained(s, "t4_1gpu", [*t4, "train.rows_per_step=32"], 1, "0", card="t4")),
        ("fsdp", lambda: trained(s, "t4_fsdp_2gpu", [*t4, "train.data_parallel=fsdp"], 2, "0,1", 29532, card="t4")),
    ]


def fsdp_memory_stages(s: Setup) -> list[tuple[str, object]]:
    shapes = {"fsdp_tinyllama_qlora_2048": [*s.shapes["tinyllama"][:1], "method=qlora"],
              "fsdp_8b_4096": [*s.shapes["8b"], "max_seq_len=4096", "train.micro_batch=1", "train.grad_accum=2"],
              "fsdp_qwen7b_2048": s.shapes["qwen7b"]}
    return [(name, lambda name=name, shape=shape, port=port: trained(
        s, name, [*COMMON, "train.max_steps=10", "save.every_steps=1000", "train.grad_accum=1", *shape,
                  "train.data_parallel=fsdp"], 2, "0,1", port, card=""))
            for port, (name, shape) in enumerate(shapes.items(), start=29541)]


def all_stages(s: Setup) -> list[tuple[str, object]]:
    """Every group's stages, most important first (one call gets as far as --budget-s allows)."""
    return [(f"{group}:{stage}", jobs) for group, stages in GROUPS.items() if group != "all" for stage, jobs in stages(s)]


GROUPS = {"tinyllama": tinyllama_stages, "8b": eight_b_stages, "t4": t4_stages, "fsdp-memory": fsdp_memory_stages,
          "all": all_stages}
# (2-GPU run, its 1-GPU reference, the first step both curves are compared from)
PAIRS = [("tinyllama_ddp_2gpu", "tinyllama_1gpu", 1), ("tinyllama_ddp_2gpu", "tinyllama_1gpu_no_graphs", 1),
         ("tinyllama_ddp_resumed_1gpu", "tinyllama_ddp_2gpu", SAVE_AT + 1),
         ("tinyllama_1gpu_resumed_2gpu", "tinyllama_1gpu", SAVE_AT + 1), ("tinyllama_2nodes", "tinyllama_ddp_2gpu", 1),
         ("8b_ddp_2gpu", "8b_1gpu", 1), ("8b_fsdp_2gpu", "8b_1gpu", 1),
         ("8b_fsdp_resumed_1gpu", "8b_fsdp_2gpu", SAVE_AT + 1),
         ("t4_ddp_2gpu", "t4_1gpu", 1), ("t4_fsdp_2gpu", "t4_1gpu", 1)]


class MemorySampler:
    """The largest memory.used of every GPU (MiB, nvidia-smi) while running: CUDA context, NCCL buffers
    and the allocator's cache included, on every rank (summary.json has rank 0's allocator peak)."""

    def __init__(self) -> None:
        self.peak_mib: dict[int, int] = {}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while shutil.which("nvidia-smi") and not self._done.wait(0.5):
            out = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True).stdout
            for line in out.strip().splitlines():
                index, used = (int(x) for x in line.split(","))
                self.peak_mib[index] = max(self.peak_mib.get(index, 0), used)

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()


def run_stage(jobs: dict[str, Job], logs: Path, timeout: float) -> dict:
    """Run a stage's jobs side by side; each one's status and seconds, and every GPU's peak memory used."""
    started, procs = time.perf_counter(), {}
    with MemorySampler() as memory:
        for name, job in jobs.items():
            env = {**NO_MULTICAST, **os.environ, "CUDA_VISIBLE_DEVICES": job.gpus,
                   "OMP_NUM_THREADS": str(max(1, os.cpu_count() // 2)), **job.env}
            log = open(logs / f"{name}.log", "w")
            procs[name] = (subprocess.Popen(job.command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO), log)
        results = {}
        for name, (proc, log) in procs.items():
            try:
                status = proc.wait(timeout=max(1.0, timeout - (time.perf_counter() - started)))
            except subprocess.TimeoutExpired:
                proc.kill()
                status = "timed out"
            log.close()
            results[name] = {"status": status, "seconds": round(time.perf_counter() - started, 1),
                             "command": " ".join(jobs[name].command), "gpus": jobs[name].gpus}
    return {"jobs": results, "gpu_peak_memory_used_mib": memory.peak_mib}


def run_report(run_dir: Path, processes: int, skip: int = 3) -> dict | None:
    """Losses per step, tokens/s (median step after `skip`; the log's figure counts every process's tokens),
    rank 0's peak memory and plan."""
    if not (run_dir / "metrics.jsonl").is_file():
        return None
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    timed = [r["tokens_per_s"] for r in steps[skip:]] or [r["tokens_per_s"] for r in steps]
    total = statistics.median(timed) if timed else None
    return {"loss": {r["step"]: r["loss"] for r in steps}, "grad_norm": {r["step"]: r["grad_norm"] for r in steps},
            "tokens_per_s": total, "tokens_per_s_per_gpu": total / processes if total else None,
            "processes": processes, "peak_reserved_bytes_rank0": summary.get("peak_memory_bytes"),
            "peak_allocated_bytes_rank0": summary.get("peak_allocated_bytes"),
            "planned": summary.get("plan"), "data_parallel": summary.get("data_parallel"),
            "speedups": summary.get("speedups"), "world_size": summary.get("world_size"),
            "resumed_from": summary.get("resumed_from"), "precision": summary.get("precision"),
            "frozen_weight_bytes_per_process": summary.get("frozen_weight_bytes_per_process"),
            "eval_loss_after": summary.get("eval_loss_after"), "wall_seconds": summary.get("wall_seconds")}


def curve_gap(a: dict | None, b: dict | None, first_step: int = 1) -> float | None:
    """Largest |loss difference| over the steps both runs logged from first_step on."""
    if not a or not b:
        return None
    shared = [s for s in a["loss"] if s in b["loss"] and s >= first_step]
    return max((abs(a["loss"][s] - b["loss"][s]) for s in shared), default=None)


def comparisons(runs: dict) -> dict:
    """Per pair: the loss-curve gap and all GPUs' tokens/s over the reference's; per run with a plan beside
    it: the planned peak over rank 0's measured one (reserved + the CUDA context, as the planner counts)."""
    found = {}
    for two, one, first in PAIRS:
        a, b = runs.get(two), runs.get(one)
        if a and b:
            found[f"{two}_vs_{one}"] = {
                "max_loss_gap": curve_gap(b, a, first),
                "tokens_per_s_ratio": a["tokens_per_s"] / b["tokens_per_s"] if a["tokens_per_s"] and b["tokens_per_s"]
                else None}
    for name, run in runs.items():
        plan = runs.get(f"plan_{name}")
        if isinstance(plan, dict) and run and run.get("peak_reserved_bytes_rank0"):
            measured = run["peak_reserved_bytes_rank0"] / 2**30 + CUDA_CONTEXT_GIB
            found[f"{name}_planned_over_measured_peak"] = {"planned_gib": plan["peak_bytes"] / 2**30,
                                                          "measured_gib": measured,
                                                          "ratio": plan["peak_bytes"] / 2**30 / measured}
    return found


def gpu_card() -> str:
    """This machine's GPU size as a `plan --gpu` budget (what `budget: auto` plans for in the runs)."""
    if not shutil.which("nvidia-smi"):  # --cpu-check
        return "16GiB"
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True).stdout
    return f"{int(out.split()[0]) / 1024:.1f}GiB"


def record(report: dict, stage: str, result: dict, jobs: dict[str, Job], logs: Path) -> None:
    """A finished stage's results into the report, and each run's metrics and summary into logs/."""
    report["stages"][stage] = result
    for name, job in jobs.items():
        if name.startswith("plan_"):
            text = (logs / f"{name}.log").read_text()
            report["runs"][name] = json.loads(text[text.index("{"):]) if "{" in text else text[-2000:]
        elif job.run is not None:
            report["runs"][job.run.name] = run_report(job.run, job.processes)
            for kept in ("metrics.jsonl", "summary.json"):
                if (job.run / kept).is_file():
                    shutil.copy(job.run / kept, logs / f"{job.run.name}.{kept}")
    report["comparisons"] = comparisons(report["runs"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--group", choices=list(GROUPS), required=True)
    parser.add_argument("--work", type=Path, help="A new folder for the runs (default: runs/two-gpu-GROUP-TIME).")
    parser.add_argument("--budget-s", type=float, default=540, help="Start no stage after this many seconds.")
    parser.add_argument("--cpu-check", action="store_true", help="Tiny shapes on the CPU: try the plumbing.")
    args = parser.parse_args()
    started = time.perf_counter()
    work = args.work or REPO / "runs" / time.strftime(f"two-gpu-{args.group}-%Y%m%d-%H%M%S")
    logs = args.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=False)  # new: an old run there would be resumed instead
    setup = Setup(work, gpu_card(), *((CPU_SHAPES, CPU, []) if args.cpu_check else (SHAPES, [], GPU_FP16)))
    report = {"group": args.group, "card_for_plan": setup.card, "stages": {}, "skipped": [], "runs": {}}
    for stage, make_jobs in GROUPS[args.group](setup):
        left = args.budget_s - (time.perf_counter() - started)
        if left < 30:
            report["skipped"].append(stage)
            continue
        jobs = make_jobs()
        record(report, stage, run_stage(jobs, logs, left), jobs, logs)
        report["elapsed_s"] = round(time.perf_counter() - started, 1)
        (args.out / f"two_gpu_{args.group}.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
