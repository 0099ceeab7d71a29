"""planner.memory's per-token activations against what a block really keeps for backward, traced on the CPU: a
Llama block with fused LoRA layers, eager and compiled with inductor's decompositions and min-cut partitioner
(backend aot_eager_decomp_partition: the partitioner that decides what inductor saves, without building C++).
Counted once per storage, at two lengths, so the per-token difference leaves out what does not grow with the
sequence (the LoRA weights' 16-bit casts)."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from conftest import planner_decisions
from snugtune.attention import use_document_attention
from snugtune.engine.fused_lora import fuse_lora_layers
from snugtune.models.load import decoder_layers
from snugtune.planner.inventory import inventory_from_config
from snugtune.planner.memory import activation_bytes_per_token_layer

# every head its own keys and values: SDPA keeps k and v at q's width, as the GPU's varlen path does
CONFIG = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=4, vocab_size=512, tie_word_embeddings=False)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _lora_llama(backend: str | None):
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**CONFIG, attn_implementation="sdpa")).to(torch.bfloat16)
    model.requires_grad_(False)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=list(TARGETS)),
                           autocast_adapter_dtype=True)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    use_document_attention(model, torch.device("cpu"))
    fuse_lora_layers(model)
    if backend:
        for layer in decoder_layers(model):
            layer.compile(backend=backend)
    return model


def _saved_by_middle_block(model, tokens: int) -> int:
    """Bytes the middle block saves for backward on a batch of 2 rows: each storage once, none that a block
    before it saved already (RoPE's cos and sin, shared by every block), no parameters."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    middle = decoder_layers(model)[1]
    inside, seen, total = [False], set(), [0]
    middle.register_forward_pre_hook(lambda *_: inside.__setitem__(0, True))
    middle.register_forward_hook(lambda *_: inside.__setitem__(0, False))

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if inside[0] and ptr not in params and ptr not in seen:
            total[0] += t.untyped_storage().nbytes()
        seen.add(ptr)
        return t
    ids = torch.randint(0, CONFIG["vocab_size"], (2, tokens // 2))
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        hidden = model.base_model.model.model(input_ids=ids, use_cache=False).last_hidden_state
    hidden.float().sum().backward()
    return total[0]


def _traced_per_token(backend: str | None) -> int:
    model = _lora_llama(backend)
    for tokens in (128, 256):  # a compiled block's first call at each length compiles it
        _saved_by_middle_block(model, tokens)
    short, long = _saved_by_middle_block(model, 128), _saved_by_middle_block(model, 256)
    return (long - short) // 128


def _counted(**changes) -> int:
    inv = inventory_from_config(LlamaConfig(**CONFIG))
    return activation_bytes_per_token_layer(inv, planner_decisions(
        method="lora", lora_r=8, grad_checkpointing=False, attention_mask=False, **changes))


@pytest.mark.slow
def test_a_compiled_block_keeps_what_the_planner_counts():
    counted = _counted(compiled_blocks=True)
    assert _traced_per_token("aot_eager_decomp_partition") == counted
    # against eager blocks: each norm keeps its 16-bit input, not an fp32 copy; the MLP keeps gate and up, not
    # act(gate); o_proj's input is attention's output itself
    h, i, c = CONFIG["hidden_size"], CONFIG["intermediate_size"], 2
    assert _counted() - counted == 2 * (4 - c) * h + c * i + c * h


def test_an_eager_block_keeps_no_more_than_the_planner_counts():
    # eager blocks count o_proj's input as its own copy (docs/planner.md: eager long-context rows on the GPU
    # kept more than the shared count); on the CPU it is attention's output itself
    assert _traced_per_token(None) == _counted() - 2 * CONFIG["hidden_size"]
