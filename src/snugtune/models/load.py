"""Loading a base model as its training method stores it (4-bit, 8-bit, 16-bit or fp32), its tokenizer, and
preparing it to train: LoRA attached or blocks unfrozen, gradient checkpointing set up. Helpers that find a
causal LM's blocks and count its parameters, peft-wrapped or not."""

from __future__ import annotations

from pathlib import Path

import torch

from snugtune.attention import use_document_attention
from snugtune.config import Config
from snugtune.errors import ConfigError, UserError
from snugtune.lora_dropout import count_lora_dropout
from snugtune.memory_rules import config_draws_random_numbers
from snugtune.methods import METHODS
from snugtune.registry import block_linear_names


def load_tokenizer(path: Path, trust_remote_code: bool = False):
    """The tokenizer of a resolved model, with a pad token (the EOS token where it has none)."""
    from transformers import AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:  # transformers' ways of saying the files are missing or bad
        raise UserError(f"{path}: no usable tokenizer ({str(exc).splitlines()[0][:160]}); the folder needs the "
                        f"model's tokenizer.json or tokenizer_config.json and vocabulary files") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(path: Path, config: Config, device: torch.device, compute_dtype: torch.dtype,
                    load_on_cpu: bool = False, shardable: bool = False):
    """Load the base model for config.method, frozen weights in their storage dtype (never up-cast).

    qlora: bitsandbytes 4-bit linear layers (nf4/fp4, optional double quant), compute in compute_dtype.
    lora-8bit: LLM.int8 linear layers. lora/freeze: compute_dtype weights. full: fp32 weights (trained).
    Embeddings, norms and lm_head stay in compute_dtype for the quantized methods.
    load_on_cpu: load (and quantize) on the CPU, for the engine to place the model itself: weight
    streaming keeps block weights in host memory, FSDP moves each block's shard to the GPU, so a model
    larger than the card never lands on it whole.
    shardable: 4-bit weights stored in compute_dtype-typed tensors (bnb_4bit_quant_storage), which FSDP
    can shard with the rest.
    """
    training_device = device
    if load_on_cpu:
        device = torch.device("cpu")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict = {"trust_remote_code": config.trust_remote_code,
                    "use_safetensors": None if config.allow_pickle_weights else True}
    bits = METHODS[config.method].base_bits
    if bits == 4:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=config.quant.type,
            bnb_4bit_use_double_quant=config.quant.double_quant, bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_quant_storage=compute_dtype if shardable else torch.uint8)
        kwargs["device_map"] = {"": device}
    elif bits == 8:
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = {"": device}
    dtype = torch.float32 if METHODS[config.method].trains_base == "all" else compute_dtype
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    if "device_map" not in kwargs:
        model.to(device)
    if bits == 4 and device.type == "cpu":
        _keep_4bit_layout_trainable(model)
    model.config.use_cache = False
    use_document_attention(model, training_device, config.train.attention_kernels)  # per document, no dense mask
    return model


def _keep_4bit_layout_trainable(model) -> None:
    """bitsandbytes (0.50) repacks 4-bit weights into an inference-only CPU layout on the first eval-mode
    forward and never packs them back; training after an eval pass then takes a kernel with no backward
    (wrong or failing gradients). Turning that fast path off keeps CPU QLoRA trainable after evaluation."""
    import bitsandbytes as bnb
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def quant_states_to(model, device: torch.device) -> None:
    """Move bitsandbytes' 4-bit scales (a QuantState per layer, not a parameter or buffer: moving a
    weight's `.data`, as weight streaming does, leaves it behind) to `device`, in place."""
    for module in model.modules():
        state = getattr(module, "quant_state", None)
        if state is not None and hasattr(state, "to"):
            state.to(device)


def check_vocab(model, tokenizer, model_name: str) -> None:
    """A tokenizer with ids beyond the embedding table would crash the GPU mid-run; refuse it up front."""
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise ConfigError(f"model: {model_name}'s tokenizer has {len(tokenizer)} tokens but its embedding has "
                          f"only {rows} rows")


def prepare_for_training(model, config: Config):
    """Attach LoRA or pick the trainable blocks; enable checkpointing. Returns the model to train.

    Trainable parameters are fp32 (the optimizer and fp16 loss scaling need full-precision masters);
    frozen ones are left exactly as loaded.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    if config.uses_lora:
        from peft import LoraConfig, get_peft_model
        targets = config.lora.targets
        if targets == "all-linear":
            targets = block_linear_names(model.config.model_type)
        present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        missing = [t for t in targets if t not in present]
        if missing:
            raise ConfigError(f"lora.targets: {missing} not found in {model.config.model_type} "
                              f"(its block linears: {block_linear_names(model.config.model_type)})")
        n_layers = model.config.num_hidden_layers
        last = config.lora.last_layers
        if last is not None and last > n_layers:
            raise ConfigError(f"lora.last_layers={last} but the model has {n_layers} blocks")
        peft_config = LoraConfig(r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
                                 target_modules=list(targets), task_type="CAUSAL_LM", bias="none",
                                 layers_to_transform=list(range(n_layers - last, n_layers)) if last else None)
        model = get_peft_model(model, peft_config, autocast_adapter_dtype=True)
        count_lora_dropout(model, config.train.seed)  # masks from a seeded hash: checkpoint- and graph-safe
    else:
        layers = decoder_layers(model)
        if METHODS[config.method].trains_base == "last_layers":
            n = config.freeze.trainable_layers
            if n > len(layers):
                raise ConfigError(f"freeze.trainable_layers={n} but the model has {len(layers)} blocks")
            trainable = [p for layer in layers[-n:] for p in layer.parameters()]
        else:
            trainable = list(model.parameters())
        for p in trainable:
            p.data = p.data.float()
            p.requires_grad_(True)
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    if config.train.grad_checkpointing is True:  # "auto" is resolved by the planner before this
        # reentrant: far less Python per recomputed op than the non-reentrant hooks, which matters in the
        # launch-bound steps of small batches (H100, TinyLlama 4x512: 5,595 vs 3,465 tok/s, same memory)
        # blocks that draw no random numbers need no generator state saved and restored around each
        # recomputation (and cannot have it inside a CUDA graph: engine.graphs)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={
            "use_reentrant": True, "preserve_rng_state": config_draws_random_numbers(model.config)})
        # partial checkpointing: blocks above the first `checkpoint_layers` keep their activations
        keep = config.train.checkpoint_layers
        if keep is not None:
            for layer in list(decoder_layers(model))[keep:]:
                layer.gradient_checkpointing = False
        gradients_reach_blocks(model)
    return model


class _GradPath(torch.autograd.Function):
    """Identity that makes its output require grad through `anchor`, a scalar leaf, without the output being
    a leaf itself: autograd keeps a leaf that requires grad alive until backward ends (its AccumulateGrad node
    holds it), and with activation offload that held the first block's input on the GPU the whole step. The
    output is a view: a family that wrote into the embeddings' output in place would need a copy here."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return (grad if ctx.needs_input_grad[0] else None), None


def _output_with_grad_path(module, args, output: torch.Tensor) -> torch.Tensor:
    return _GradPath.apply(output, torch.zeros((), requires_grad=True))


def gradients_reach_blocks(model) -> None:
    """Frozen embeddings give the blocks inputs without grad, and a checkpointed block whose inputs need no
    grad gives its LoRA (or trained) weights none: make the input embeddings' output require grad (again after
    the embeddings module is replaced). transformers' enable_input_require_grads does it by making that output
    a leaf; see _GradPath for why not here."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    old = getattr(inner, "_snugtune_grad_path", None)
    if old is not None:
        old.remove()
    inner._snugtune_grad_path = inner.get_input_embeddings().register_forward_hook(_output_with_grad_path)


def decoder_layers(model) -> torch.nn.ModuleList:
    """The transformer blocks of a causal LM (peft-wrapped or not)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.model.layers


def causal_lm_parts(model):
    """(backbone returning hidden states, output head) of a causal LM, peft-wrapped or not."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.model, inner.get_output_embeddings()


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit packed weights count as their logical size."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if hasattr(p, "quant_state") and p.quant_state is not None:  # Params4bit packs 2 values per byte
            n = int(p.quant_state.shape.numel()) if hasattr(p.quant_state, "shape") else n * 2
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total
