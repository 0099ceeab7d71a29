"""Activation offload on a GPU against none: LoRA gradients on the same batch, step time and peak memory.

  python measure/offload_check.py [--tokens 28672] [--layers 8] [--steps 4] [--profile]

A random Llama-3.1-8B-shaped stack cut to `--layers` blocks (bf16 weights, LoRA r16 on q/k/v/o, every block
checkpointed as the engine does it), one row of `--tokens` tokens. Prints one line per variant: the median
step time after a warm-up step, peak allocated memory and the largest gradient difference from no offload.
The loss is transformers' own on full logits, whose fp32 tensors the offload moves too: on an H100 (2026-12-07,
docs/decisions.md) offload cost 0.31 s a step over none, about 0.27 s of it those logits, which a training step
of the engine (chunked loss) never keeps. `--profile` then prints, for one offloaded step, the ops that took the
most CUDA and CPU time and, for each copy, how much of it ran beside another stream's kernels.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from snugtune.engine.offload import ActivationOffload
from snugtune.models.load import gradients_reach_blocks

GIB = 2**30


def build(layers: int) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072)
    model = LlamaForCausalLM(config).to(torch.bfloat16).cuda()
    model.requires_grad_(False)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                   "o_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    gradients_reach_blocks(model)
    model.train()
    return model


def step(model, ids, offload):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", torch.bfloat16), offload or torch.autograd.graph.saved_tensors_hooks(lambda t: t,
                                                                                                     lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.cuda.synchronize()
    return {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=28672)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--profile", action="store_true", help="profile one offloaded step after the timings")
    args = parser.parse_args()
    model = build(args.layers)
    ids = torch.randint(0, 32000, (1, args.tokens), generator=torch.Generator().manual_seed(0)).cuda()
    variants = {"no offload": lambda: None, "offload": lambda: ActivationOffload()}
    expected = None
    print(f"{torch.cuda.get_device_name()}, {args.layers} blocks of the llama3-8b shape, 1 x {args.tokens} tokens",
          flush=True)
    for name, make in variants.items():
        offload = make()
        grads = step(model, ids, offload)  # warm-up
        times = []
        torch.cuda.reset_peak_memory_stats()
        for _ in range(args.steps):
            start = time.perf_counter()
            grads = step(model, ids, offload)
            times.append(time.perf_counter() - start)
        expected = expected or grads
        diff = max((grads[k] - expected[k]).abs().max().item() for k in expected)
        print(f"{name:20s} {statistics.median(times):.3f} s/step  peak {torch.cuda.max_memory_allocated() / GIB:.2f} "
              f"GiB  max |grad - no offload| {diff:.3g}", flush=True)
    if args.profile:
        profile(model, ids)


def profile(model, ids) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    offload = ActivationOffload()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step(model, ids, offload)
    events = prof.key_averages()
    print(events.table(sort_by="self_cuda_time_total", row_limit=15), flush=True)
    print(events.table(sort_by="self_cpu_time_total", row_limit=15), flush=True)
    with tempfile.TemporaryDirectory() as folder:
        prof.export_chrome_trace(f"{folder}/trace.json")
        trace = json.loads(Path(folder, "trace.json").read_text())
    print("copy (stream): ms, of which ms beside kernels of other streams", flush=True)
    for name, stream, duration, beside in copy_overlap(trace.get("traceEvents", [])):
        print(f"{name} ({stream}): {duration:.2f}, {beside:.2f}", flush=True)


def copy_overlap(events: list[dict]) -> list[tuple[str, object, float, float]]:
    """For each copy of a chrome trace: (name, its stream, its ms, the ms of it during which a kernel of
    another stream ran): whether the offload's copies overlap compute."""
    kernels = [(e["ts"], e["ts"] + e["dur"], e.get("args", {}).get("stream")) for e in events
               if e.get("cat") == "kernel" and "dur" in e]
    rows = []
    for copy in (e for e in events if e.get("cat") == "gpu_memcpy" and "dur" in e):
        start, end, stream = copy["ts"], copy["ts"] + copy["dur"], copy.get("args", {}).get("stream")
        spans = sorted((max(a, start), min(b, end)) for a, b, s in kernels if s != stream and a < end and b > start)
        beside, reach = 0.0, start
        for a, b in spans:  # the union of the other streams' kernels within the copy
            if b > reach:
                beside += b - max(a, reach)
                reach = b
        rows.append((copy["name"], stream, copy["dur"] / 1000, beside / 1000))
    return rows


if __name__ == "__main__":
    main()
