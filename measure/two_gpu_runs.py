"""The two-GPU runs of docs/distributed.md, in one command, on a machine with two GPUs of one host.

    export PYTHONPATH=$PWD/.devsite:$PWD/src NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \\
           NVSHMEM_DISABLE_NVLS=1
    python3 measure/two_gpu_runs.py $OUT [--budget-s 540]

Runs, most important first, in stages (runs of one stage share the machine, one GPU each):
1. Llama-3.1-8B shape QLoRA on 1 GPU (4 rows a step)  ||  TinyLlama shape LoRA on 1 GPU (4 rows a step)
2. the 8B under FSDP on 2 GPUs (2 rows a step on each: the same effective batch), checkpoint at step 10
3. TinyLlama under DDP on 2 GPUs, checkpoint at step 10
4. the FSDP checkpoint of step 10 resumed on 1 GPU  ||  the DDP checkpoint of step 10 resumed on 1 GPU
5. the DDP checkpoint resumed on 2 GPUs
6. the FSDP checkpoint resumed on 2 GPUs (last: every process loads and quantizes the 8B on the host)
with `snugtune plan --gpus 1/2 --json` for both models beside them. Every GPU's memory in use is
sampled (nvidia-smi, every 0.5 s) during each stage. OUT/two_gpu_runs.json is rewritten after every
stage, so a run cut short still reports what finished; stages that would start after --budget-s are
skipped and listed as such. Run folders (checkpoints included) go to a new runs/two-gpu-TIME folder
of the repository (or --work DIR); OUT receives only each run's metrics.jsonl, summary.json and log.
Every job gets OMP_NUM_THREADS = cores / 2 (two jobs or two ranks share the host): torchrun would set 1,
and under FSDP each process quantizes the 8B on the host, which takes minutes on one thread.
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
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "src" / "snugtune" / "bundled" / "stdlib_functions.jsonl"
CONFIG = REPO / "examples" / "llama3-8b_qlora_2xt4.yaml"
STEPS, SAVE_AT = 20, 10
# NVLink multicast stays off on the lent machines (set by the caller too; these are the defaults)
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
# fixed settings on both sides (the planner only checks they fit): checkpointing every block, micro-batch 2,
# no dropout, so the 1- and 2-GPU curves compare and memory differs only by what FSDP shards
COMMON = [f"data.path={DATA}", f"train.max_steps={STEPS}", f"save.every_steps={SAVE_AT}", "lora.dropout=0",
          "train.micro_batch=2", "train.rows_per_step=null",  # rows per step set here, not the recipe's
          "train.grad_checkpointing=true", "budget=auto", "eval.max_batches=2"]
MODELS = {"8b": ["model=shape:llama3-8b", "train.data_parallel=fsdp"],
          "tinyllama": ["model=shape:tinyllama-1.1b", "method=lora", "train.data_parallel=ddp"]}
# --cpu-check: the same plumbing with tiny shapes on the CPU (gloo), to try the script without GPUs
CPU_CHECK_MODELS = {"8b": ["model=shape:tiny-llama3-8b", "train.data_parallel=fsdp", "device=cpu",
                           "max_seq_len=256"],
                    "tinyllama": ["model=shape:tiny-tinyllama-1.1b", "method=lora", "train.data_parallel=ddp",
                                  "device=cpu", "max_seq_len=256"]}


def train_command(model: list[str], processes: int, run_dir: Path, port: int = 29500) -> list[str]:
    """4 rows a step whatever the process count: micro 2 x accumulation (2 / processes) x processes."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
                "--master-port", str(port)] if processes > 1 else [sys.executable]
    return [*launcher, "-m", "snugtune", "train", str(CONFIG), *COMMON, *model,
            f"train.grad_accum={2 // processes}", f"output_dir={run_dir}", "--quiet"]


def plan_command(model: list[str], processes: int, card: str) -> list[str]:
    return [sys.executable, "-m", "snugtune", "plan", str(CONFIG), *COMMON, *model,
            f"train.grad_accum={2 // processes}", "--gpus", str(processes), "--gpu", card, "--json"]


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


def run_stage(jobs: dict[str, tuple[list[str], str]], logs: Path, timeout: float) -> dict:
    """Run jobs (name -> (command, CUDA_VISIBLE_DEVICES)) side by side; each one's status and seconds."""
    started, procs = time.perf_counter(), {}
    with MemorySampler() as memory:
        for name, (command, gpus) in jobs.items():
            env = {**NO_MULTICAST, **os.environ, "CUDA_VISIBLE_DEVICES": gpus,
                   "OMP_NUM_THREADS": str(max(1, os.cpu_count() // 2))}
            log = open(logs / f"{name}.log", "w")
            procs[name] = (subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO), log)
        results = {}
        for name, (proc, log) in procs.items():
            try:
                status = proc.wait(timeout=max(1.0, timeout - (time.perf_counter() - started)))
            except subprocess.TimeoutExpired:
                proc.kill()
                status = "timed out"
            log.close()
            results[name] = {"status": status, "seconds": round(time.perf_counter() - started, 1),
                             "command": " ".join(jobs[name][0]), "gpus": jobs[name][1]}
    return {"jobs": results, "gpu_peak_memory_used_mib": memory.peak_mib}


def run_report(run_dir: Path, processes: int, skip: int = 3) -> dict | None:
    """Losses per step, tokens/s per GPU (median step after `skip`), rank 0's peak memory and plan."""
    if not (run_dir / "metrics.jsonl").is_file():
        return None
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    timed = [r["tokens_per_s"] for r in steps[skip:]] or [r["tokens_per_s"] for r in steps]
    return {"loss": {r["step"]: r["loss"] for r in steps}, "grad_norm": {r["step"]: r["grad_norm"] for r in steps},
            "tokens_per_s_per_gpu_median": statistics.median(timed) / processes if timed else None,
            "peak_reserved_bytes_rank0": summary.get("peak_memory_bytes"),
            "peak_allocated_bytes_rank0": summary.get("peak_allocated_bytes"),
            "planned": summary.get("plan"), "data_parallel": summary.get("data_parallel"),
            "world_size": summary.get("world_size"), "resumed_from": summary.get("resumed_from"),
            "frozen_weight_bytes_per_process": summary.get("frozen_weight_bytes_per_process"),
            "eval_loss_after": summary.get("eval_loss_after"), "wall_seconds": summary.get("wall_seconds")}


def curve_gap(a: dict | None, b: dict | None, first_step: int = 1) -> float | None:
    """Largest |loss difference| over the steps both runs logged from first_step on."""
    if not a or not b:
        return None
    shared = [s for s in a["loss"] if s in b["loss"] and s >= first_step]
    return max((abs(a["loss"][s] - b["loss"][s]) for s in shared), default=None)


def resumable_copy(source: Path, target: Path) -> None:
    """The run as if stopped after step SAVE_AT: its later checkpoint removed."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(f"step-{STEPS}"))


def stages(work: Path, card: str, models: dict[str, list[str]]) -> list[tuple[str, dict]]:
    one8, one_tiny = work / "8b_1gpu", work / "tinyllama_1gpu"
    fsdp, ddp = work / "8b_fsdp_2gpu", work / "tinyllama_ddp_2gpu"
    return [
        ("references", {"8b_1gpu": (train_command(models["8b"], 1, one8), "0"),
                        "tinyllama_1gpu": (train_command(models["tinyllama"], 1, one_tiny), "1"),
                        **{f"plan_{m}_{n}gpu": (plan_command(models[m], n, card), "") for m in models for n in (1, 2)}}),
        ("fsdp", {"8b_fsdp_2gpu": (train_command(models["8b"], 2, fsdp, 29511), "0,1")}),
        ("ddp", {"tinyllama_ddp_2gpu": (train_command(models["tinyllama"], 2, ddp, 29512), "0,1")}),
        ("resume_on_1", {"8b_fsdp_resumed_1gpu": (train_command(models["8b"], 1, work / "8b_fsdp_resumed_1gpu"), "0"),
                         "tinyllama_ddp_resumed_1gpu": (train_command(models["tinyllama"], 1,
                                                                      work / "tinyllama_ddp_resumed_1gpu"), "1")}),
        ("ddp_resume_on_2", {"tinyllama_ddp_resumed_2gpu": (
            train_command(models["tinyllama"], 2, work / "tinyllama_ddp_resumed_2gpu", 29513), "0,1")}),
        ("fsdp_resume_on_2", {"8b_fsdp_resumed_2gpu": (
            train_command(models["8b"], 2, work / "8b_fsdp_resumed_2gpu", 29514), "0,1")}),
    ]


def prepare_resumes(work: Path) -> None:
    """After the 2-GPU runs: copies of them stopped at step SAVE_AT, for the resume stages."""
    for source, copies in (("8b_fsdp_2gpu", ("8b_fsdp_resumed_1gpu", "8b_fsdp_resumed_2gpu")),
                           ("tinyllama_ddp_2gpu", ("tinyllama_ddp_resumed_1gpu", "tinyllama_ddp_resumed_2gpu"))):
        for copy in copies:
            if (work / source / "checkpoints" / f"step-{SAVE_AT}").is_dir() and not (work / copy).exists():
                resumable_copy(work / source, work / copy)


def comparisons(runs: dict) -> dict:
    """The figures the docs quote: curve gaps, memory and throughput, 2 GPUs against 1."""
    def ratio(a, b, key):
        return (runs[a][key] / runs[b][key]) if runs.get(a) and runs.get(b) and runs[b][key] else None
    return {"8b_fsdp_vs_1gpu_max_loss_gap": curve_gap(runs.get("8b_1gpu"), runs.get("8b_fsdp_2gpu")),
            "8b_resumed_1gpu_vs_fsdp_max_loss_gap": curve_gap(runs.get("8b_fsdp_2gpu"),
                                                              runs.get("8b_fsdp_resumed_1gpu"), SAVE_AT + 1),
            "8b_resumed_2gpu_vs_fsdp_max_loss_gap": curve_gap(runs.get("8b_fsdp_2gpu"),
                                                              runs.get("8b_fsdp_resumed_2gpu"), SAVE_AT + 1),
            "tinyllama_ddp_vs_1gpu_max_loss_gap": curve_gap(runs.get("tinyllama_1gpu"), runs.get("tinyllama_ddp_2gpu")),
            "tinyllama_resumed_1gpu_vs_ddp_max_loss_gap": curve_gap(runs.get("tinyllama_ddp_2gpu"),
                                                                    runs.get("tinyllama_ddp_resumed_1gpu"), SAVE_AT + 1),
            "tinyllama_resumed_2gpu_vs_ddp_max_loss_gap": curve_gap(runs.get("tinyllama_ddp_2gpu"),
                                                                    runs.get("tinyllama_ddp_resumed_2gpu"), SAVE_AT + 1),
            "8b_peak_reserved_2gpu_over_1gpu": ratio("8b_fsdp_2gpu", "8b_1gpu", "peak_reserved_bytes_rank0"),
            "8b_tokens_per_s_per_gpu_2gpu_over_1gpu": ratio("8b_fsdp_2gpu", "8b_1gpu", "tokens_per_s_per_gpu_median"),
            "tinyllama_tokens_per_s_per_gpu_2gpu_over_1gpu": ratio("tinyllama_ddp_2gpu", "tinyllama_1gpu",
                                                                    "tokens_per_s_per_gpu_median")}


def gpu_card() -> str:
    """This machine's GPU size as a `plan --gpu` budget (what `budget: auto` plans for in the runs)."""
    if not shutil.which("nvidia-smi"):  # --cpu-check
        return "16GiB"
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True).stdout
    return f"{int(out.split()[0]) / 1024:.1f}GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--work", type=Path, help="A new folder for the runs (default: runs/two-gpu-TIME).")
    parser.add_argument("--budget-s", type=float, default=540, help="Start no stage after this many seconds.")
    parser.add_argument("--cpu-check", action="store_true", help="Tiny shapes on the CPU: try the plumbing.")
    args = parser.parse_args()
    started = time.perf_counter()
    work = args.work or REPO / "runs" / time.strftime("two-gpu-%Y%m%d-%H%M%S")
    logs = args.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=False)  # new: an old run there would be resumed instead
    card = gpu_card()
    report = {"card_for_plan": card, "steps": STEPS, "rows_per_step": 4, "stages": {}, "skipped": [], "runs": {}}
    for stage, jobs in stages(work, card, CPU_CHECK_MODELS if args.cpu_check else MODELS):
        left = args.budget_s - (time.perf_counter() - started)
        if left < 30:
            report["skipped"].append(stage)
            continue
        if stage == "resume_on_1":
            prepare_resumes(work)
        report["stages"][stage] = run_stage(jobs, logs, left)
        for name, job in report["stages"][stage]["jobs"].items():
            if name.startswith("plan_"):
                text = (logs / f"{name}.log").read_text()
                report["runs"][name] = json.loads(text[text.index("{"):]) if "{" in text else text[-2000:]
                continue
            report["runs"][name] = run_report(work / name, 2 if job["gpus"] == "0,1" else 1)
            for kept in ("metrics.jsonl", "summary.json"):
                if (work / name / kept).is_file():
                    shutil.copy(work / name / kept, logs / f"{name}.{kept}")
        report["comparisons"] = comparisons(report["runs"])
        report["elapsed_s"] = round(time.perf_counter() - started, 1)
        (args.out / "two_gpu_runs.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
