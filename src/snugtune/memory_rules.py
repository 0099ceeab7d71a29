"""Sizes and rules that the engine runs by and the planner predicts by: both import them from here, so a
change to one is a change to the other (tests/test_memory_rules.py ties them).

Sizes are bytes or tokens; rules are plain functions of the run's resolved settings.
"""

from __future__ import annotations

from math import gcd

from snugtune.registry import FAMILIES

MIB = 2**20
CUDA_CONTEXT_BYTES = 685 * MIB    # driver + cuBLAS handles, outside torch's allocator (measured: H100, CUDA 13)
LOGITS_CHUNK_BYTES = 128 * MIB    # fp32 logits the chunked loss holds at once
MLP_TILE_TOKENS = 8192            # tokens one MLP tile holds intermediates for (train.tiled_mlp)
ATTENTION_HEAD_GROUPS = 8         # most groups of heads tiled attention differentiates one at a time
ATTENTION_GRAD_BYTES = 8          # flash backward's transient per query value: fp32 query-gradient accumulator,
                                  # 16-bit key and value gradients expanded to every query head (H200, 98,304
                                  # tokens of Llama-3.1-8B: 3 GiB; measure/attention_memory.py)
# model type -> its transformers RMSNorm class, whose forward engine.lean_norm computes keeping less
LEAN_NORMS = {model_type: family.lean_norm for model_type, family in FAMILIES.items() if family.lean_norm}
MLP_NORMS = {model_type: family.mlp_norm for model_type, family in FAMILIES.items() if family.mlp_norm}
# a model config's fields that turn on dropout in its blocks (transformers' names across families)
DROPOUT_FIELDS = ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout",
                  "hidden_dropout_prob", "attention_probs_dropout_prob", "activation_dropout")


def logits_chunk_tokens(vocab: int, chunk_bytes: int = LOGITS_CHUNK_BYTES) -> int:
    """Positions whose fp32 logits the chunked loss computes at once."""
    return max(64, chunk_bytes // (4 * vocab))


def config_draws_random_numbers(model_config) -> bool:
    """Whether a training forward through the model's blocks draws from the random generator: any dropout in
    its own config (full and freeze methods train with it). LoRA dropout draws none: its masks come from a
    seeded hash (snugtune.lora_dropout). Such blocks need the generator saved around each recomputation and
    cannot replay as CUDA graphs."""
    return any(float(getattr(model_config, name, 0) or 0) > 0 for name in DROPOUT_FIELDS)


def compiles_blocks(setting: bool | str, cuda: bool, streams_weights: bool) -> bool:
    """train.compile resolved: auto compiles on a CUDA GPU without weight streaming (its hooks swap the
    weights a compiled block would be specialised on), in every process under torchrun. Activation offload
    and MLP tiling compile: their hooks and inner checkpoints run outside the compiled forward (H200,
    llama3-8b at 28,672 tokens under 15 GiB: 6,614 tokens/s compiled against 5,306 eager, the same peak
    memory). DDP's gradient hooks sit on the parameters, outside the compiled code; FSDP2's unshard and
    reshard hooks are dynamo-disabled, so a block compiled in place runs them eagerly around its compiled
    body (gloo, CPU: tests/engine/test_distributed.py gives the gradients of one process)."""
    if setting != "auto":
        return bool(setting)
    return cuda and not streams_weights


def head_group_count(kv_heads: int, most: int) -> int:
    """Groups of heads attention goes by (attention.head_groups): whole key/value heads each, at most `most`."""
    return gcd(kv_heads, most)


def tiles_attention(tiled_mlp: bool, compiling: bool) -> bool:
    """Whether attention runs over groups of heads (attention.head_groups, engine.tiling.tile_attention):
    with MLP tiling (a long context short of memory), in blocks that run eagerly (its backward
    differentiates each group's recomputed forward, which a compiled block cannot trace)."""
    return tiled_mlp and not compiling


def leans_norms(tiled_mlp: bool, compiling: bool, model_type: str) -> bool:
    """Whether the model's norms keep only their 16-bit input for backward (engine.lean_norm): where attention
    goes by groups of heads, for the families in LEAN_NORMS. Compiled blocks fuse the norm and save what
    inductor picks; short rows keep transformers' faster norm."""
    return tiles_attention(tiled_mlp, compiling) and model_type in LEAN_NORMS


def norms_in_mlp_tiles(lean_norms: bool, model_type: str) -> bool:
    """Whether the norm before each MLP runs inside the MLP's tiles (engine.tiling.tile_mlps): with lean norms
    (the eager long-row path), for the families whose block names that norm (MLP_NORMS). The tiles then keep
    their slice of the norm's input, which the norm kept anyway, instead of a second tensor, its output."""
    return lean_norms and model_type in MLP_NORMS


def holds_dense_copy(asked: bool, four_bit: bool, sharded: bool, streams_weights: bool) -> bool:
    """quant.dense_copy resolved (asked: true, or the planner's choice under auto): a 16-bit copy of the 4-bit
    block weights for the run, on a 4-bit base, not under FSDP (each process would hold every block's copy
    whole, undoing the sharding FSDP was chosen for) and not with weight streaming (the block weights live
    in host memory)."""
    return asked and four_bit and not sharded and not streams_weights


def fuses_lora(adapters: bool, base_bits: int | None) -> bool:
    """Whether LoRA layers run as one fused autograd function each (engine.fused_lora): adapters on a 16-bit or
    4-bit base (LLM.int8 keeps bitsandbytes' own matmul), under DDP and FSDP too. Under FSDP the function reads
    the LoRA weights at each call (FSDP swaps in the gathered ones for the forward) and dequantizes the
    gathered 4-bit weight, a plain tensor of the compute dtype (bnb_4bit_quant_storage), with the scales
    bitsandbytes keeps on the layer."""
    return adapters and base_bits != 8


def keeps_dense_weights(compiling: bool, checkpointed: bool, anything_offloaded: bool, dense_copy: bool) -> bool:
    """Whether a block's fused LoRA layers keep their dequantized weight from forward to backward:
    compiled, checkpointed blocks (recomputed one at a time: one block's dense weights extra at the
    peak), only when nothing is offloaded (offload means memory is short), and not beside a dense copy
    (nothing is dequantized then)."""
    return compiling and checkpointed and not anything_offloaded and not dense_copy


# sequences one row of an objective's data holds at most: a pair's chosen and rejected (packed into one row, or
# laid out as two); KTO's mismatched rows run in a forward of their own, without gradient
SEQUENCES_PER_ROW = {"sft": 1, "dpo": 2, "orpo": 2, "kto": 1}


def forwards_without_gradient(objective: str, reference: str) -> int:
    """Forward passes without gradient over a micro-batch's rows that an objective's loss needs beside the
    trained one: DPO the reference's; KTO the reference's over its rows and over the mismatched rows, and the
    policy's over the mismatched rows (its reference point). A precomputed reference counts too: its pass over
    the rows before training is the same work (once, where a one-epoch run does it once anyway)."""
    references = 0 if reference == "none" else 1
    if objective == "dpo":
        return references
    if objective == "kto":
        return 2 * references + 1
    return 0


def objective_replays(objective: str) -> bool:
    """Whether a micro-batch of this objective can be captured as a CUDA graph: sft, dpo and orpo. Their
    losses run every position through the head and add it to its answer's sum with a fixed-size index
    (preference_loss.group_logps, fixed_shape), and DPO's reference forward (the adapter disabled) is recorded
    beside the policy's. Not KTO: its reference point is computed over the whole step before its micro-batches,
    and its metrics split rows by label (shapes that depend on the data)."""
    return objective in ("sft", "dpo", "orpo")


def reference_for(objective: str, adapters: bool, copy_fits: bool) -> str:
    """Where a preference objective's reference log-probabilities come from: 'none' (sft, and orpo, which
    has no reference), 'adapter' (LoRA methods: the base is the model with its adapter disabled, no second
    copy), else, for full and freeze, 'copy' (a frozen 16-bit copy of the base, where the planner finds the
    run fits with it at as fast a split as without: nothing is computed before the first step or written)
    or 'precomputed' (every example's reference log-probabilities computed once before training and kept
    in the run folder: no memory, one forward pass over the data)."""
    if objective in ("sft", "orpo"):
        return "none"
    if adapters:
        return "adapter"
    return "copy" if copy_fits else "precomputed"


def replays_cuda_graphs(setting: bool | str, compiling: bool, cuda: bool, one_process: bool,
                        streams_weights: bool, method_replays: bool, offloads_activations: bool, tiles_mlp: bool,
                        draws_random_numbers: bool, objective: str = "sft") -> bool:
    """train.cuda_graphs resolved: possible on a CUDA device in one process for methods whose step a graph can
    hold (methods.Method.replays_graphs: LoRA on a base that never waits on the GPU; a frozen head: the loss
    needs no data-dependent shapes) and objectives whose step one can (objective_replays), without
    weight streaming, activation offload (its copies to host memory are made per step) or MLP tiling, and
    when no block draws random numbers (checkpointing cannot restore the generator in a graph). auto: where
    possible and blocks are compiled.

    Not under several processes: a graph of a step must hold its collectives. For DDP, PyTorch's CUDA notes
    ("Usage with DistributedDataParallel") ask for NCCL_ASYNC_ERROR_HANDLING=0, which turns off the watchdog
    that ends a process whose peer died (train.collective_timeout_s). Capturing FSDP2 is recent (pytorch
    #164264; torchtitan#3559 lists FSDP settings its CUDA-graph trainer cannot capture), and engine.graphs
    captures the unwrapped model, whose weights FSDP gathers only inside its hooks. Not measured here: no
    machine with two GPUs has run it."""
    possible = (cuda and one_process and not streams_weights and method_replays and not offloads_activations
                and not tiles_mlp and not draws_random_numbers and objective_replays(objective))
    if setting != "auto":
        return bool(setting) and possible
    return possible and compiling


def rows_masked(packing: bool, varlen_attention: bool, several_samples_a_row: bool = True) -> bool:
    """Whether batches carry a dense attention mask: rows packing several samples, where no varlen flash kernel
    attends per document (cards before compute capability 8.0, the CPU). Padded batches and rows of one sample
    each run plain causal attention."""
    return packing and not varlen_attention and several_samples_a_row


def optimizer_for(asked: str, sharded: bool) -> str:
    """train.optimizer resolved: under FSDP torch AdamW (bitsandbytes' optimizers do not take sharded
    tensors; LoRA's state is small), else as asked."""
    return "adamw" if sharded else asked


def memory_cap_fraction(budget_bytes: int, total_bytes: int) -> float | None:
    """The share of a GPU of total_bytes a process may allocate to behave as a card of budget_bytes (a budget
    simulated on a bigger GPU): the card's CUDA context lies outside torch's allocator but inside its memory.
    None when the GPU is no bigger than the budget."""
    return (budget_bytes - CUDA_CONTEXT_BYTES) / total_bytes if budget_bytes < total_bytes else None
