"""The run configuration: one validated object, built once from YAML (+ key=value overrides).

Every field has a help text; unknown keys are errors that name the closest valid key.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from snugtune.errors import ConfigError
from snugtune.data.format_registry import FORMATS, column_fields
from snugtune.methods import METHODS
from snugtune.planner.cards import budget_bytes


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


COUNT_LIMIT = 10**9  # the most of anything counted (steps, rows, layers, tokens): far past any real run
SEED_LIMIT = 2**32 - 1  # the seeds numpy and transformers.set_seed take; LoRA dropout reads the low 32 bits


def _a_name_or_path(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    if "\0" in value:
        raise ValueError("must not contain a NUL character")
    return value


Text = Annotated[str, AfterValidator(_a_name_or_path)]  # a name or path: '' would mean the current folder


DATA_FIELDS = column_fields()


class DataConfig(_Section):
    path: Text = Field(description="Data file (.jsonl/.json/.csv/.tsv/.parquet/.txt, or .gz of a text one) or "
                      "folder, relative to the config file, or a dataset id on the Hugging Face hub (owner/name).")
    format: Literal[("auto", *FORMATS)] = Field(
        "auto", description="Row format (" + ", ".join(FORMATS) + "); auto detects it from the first rows and "
                            "says what it chose.")
    columns: dict[str, str] = Field(
        default_factory=dict, description="Map format fields to the file's column names, {FIELD: COLUMN}: e.g. "
        "{instruction: question, output: answer}, {text: code}, {messages: dialog, role: speaker, content: text}. "
        "Fields: " + ", ".join(DATA_FIELDS) + ".")
    system_prompt: str | None = Field(None, description="System message for conversations that have none of their own.")
    chat_template: str | None = Field(
        None, description="Chat template instead of the model's: 'chatml', 'alpaca', a .jinja file (relative to "
                          "the config file) or the Jinja text itself. Default: the model's own; a model without "
                          "one gets ChatML when its vocabulary has ChatML's tokens, else Alpaca-style text + EOS.")
    subset: str | None = Field(None, description="Hub dataset: the configuration (subset) name.")
    split: str = Field("train", description="The split to read where the data holds several: a hub dataset's, "
                       "a folder's (data/<split>-* shards, train.jsonl/test.jsonl-style names, save_to_disk's "
                       "DatasetDict), the key of a JSON file's rows ({train: [...], test: [...]}).")
    dataset: str | None = Field(None, description="A LLaMA-Factory data folder: the entry of its dataset_info.json "
                                "to read (its file, formatting, columns and tags); needed when it has several.")
    revision: str | None = Field(None, description="Hub dataset: a branch, tag or commit.")
    max_samples: int | None = Field(None, ge=1, le=COUNT_LIMIT, description="Use at most this many rows (after shuffling with the "
                                    "seed); a hub dataset is streamed and only this many rows are read.")
    eval_fraction: float = Field(0.05, ge=0.0, lt=1.0, allow_inf_nan=False, description="Share of rows held out for evaluation.")
    too_long: Literal["truncate", "drop"] = Field(
        "truncate", description="What to do with conversations longer than max_seq_len (text documents are split "
                                "into chunks of max_seq_len instead).")
    reasoning: Literal["train", "drop"] = Field(
        "train", description="Reasoning traces of assistant turns (reasoning_content, thinking): train them as part "
                             "of the answer (rendered by the chat template where it can, else as <think>...</think> "
                             "before the answer), or drop them and train the answer alone.")
    train_on_prompt: bool = Field(False, description="Also train on prompt tokens (default: assistant tokens only).")
    skip_bad_rows: bool = Field(False, description="Skip malformed rows (counted) instead of stopping with exit 2.")
    packing: bool = Field(True, description="Padding-free batches: pack samples into rows of max_seq_len tokens "
                          "(attention cannot cross samples). false: pad to the longest, grouped by length.")

    @model_validator(mode="after")
    def _known_columns(self) -> "DataConfig":
        unknown = sorted(set(self.columns) - set(DATA_FIELDS))
        if unknown:
            raise ValueError(f"data.columns: unknown field '{unknown[0]}' (fields: {', '.join(DATA_FIELDS)}; "
                             f"write {{FIELD: YOUR_COLUMN}})")
        return self


class LoraConfig(_Section):
    r: int = Field(16, ge=1, le=65536, description="LoRA rank.")
    alpha: float = Field(32, gt=0, le=1e6, allow_inf_nan=False, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, allow_inf_nan=False, description="Dropout on the LoRA input.")
    targets: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="Module names to adapt, or 'all-linear' for every linear layer but the output head.")
    last_layers: int | None = Field(None, ge=1, le=COUNT_LIMIT, description="Adapt only the last N transformer blocks (null = all).")


class QuantConfig(_Section):
    bits: Literal[4, 8] | None = Field(None, description="4 for qlora, 8 for lora-8bit; implied by the method.")
    type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type (bitsandbytes).")
    double_quant: bool = Field(True, description="Quantize the 4-bit block scales too (saves ~0.4 bit/param).")
    dense_copy: bool | Literal["auto"] = Field(
        "auto", description="4-bit: also hold a 16-bit copy of the frozen block weights on the GPU, dequantized "
                            "once at the start: the same values bitsandbytes dequantizes in every forward and "
                            "backward, so steps spend no time dequantizing (Llama-3.1-8B: 13 GiB more). Not under "
                            "FSDP or weight streaming. auto: where nothing is offloaded, when the planner finds "
                            "the run fits with it and is faster.")


class FreezeConfig(_Section):
    trainable_layers: int = Field(2, ge=1, le=COUNT_LIMIT, description="method=freeze: train only the last N transformer blocks.")


class TrainConfig(_Section):
    epochs: float = Field(1, gt=0, le=1e6, allow_inf_nan=False, description="Passes over the training split (ignored when max_steps is set).")
    max_steps: int | None = Field(None, ge=1, le=COUNT_LIMIT, description="Stop after this many optimizer steps.")
    micro_batch: int | Literal["auto"] = Field(
        4, description="Sequences per forward pass. auto: the planner splits train.rows_per_step into the "
                             "fastest micro-batch x accumulation that fits the card (results do not depend on "
                             "the split: losses are token-normalised).")
    grad_accum: int = Field(1, ge=1, le=COUNT_LIMIT, description="Micro-batches per optimizer step (with micro_batch: auto, the "
                                                 "planner's).")
    rows_per_step: int | None = Field(None, ge=1, le=COUNT_LIMIT, description="Sequences (rows) per optimizer step; needed with "
                                      "micro_batch: auto. null: micro_batch x grad_accum.")
    lr: float = Field(2e-4, gt=0, le=1.0, allow_inf_nan=False, description="Peak learning rate.")
    scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="Learning-rate decay after warmup.")
    warmup: float = Field(0.03, ge=0, le=COUNT_LIMIT, allow_inf_nan=False, description="Warmup: a fraction of total steps if < 1, else a step count.")
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = Field(
        "adamw", description="adamw (torch) or bitsandbytes 8-bit AdamW (paged: state pages to CPU under pressure).")
    weight_decay: float = Field(0.0, ge=0, le=1.0, allow_inf_nan=False, description="AdamW weight decay.")
    max_grad_norm: float | None = Field(1.0, gt=0, allow_inf_nan=False, description="Clip the global gradient norm to this; null = no clipping.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto: bf16 where the GPU has it, fp16 + loss scaling where not (T4); on a CPU bf16 "
                            "where it multiplies bf16 natively (AVX512-BF16 or AMX), else fp32.")
    attention_kernels: Literal["auto", "sm75"] = Field(
        "auto", description="Attention kernels training may use. auto: the fastest the GPU has (flash and cuDNN; "
                            "varlen flash for packed rows from compute capability 8.0). sm75: only what a T4 "
                            "(compute capability 7.5) has: SDPA's memory-efficient and math kernels, packed rows "
                            "through a dense block-diagonal mask (`snugtune bench --emulate t4` runs a T4's path "
                            "on a newer GPU with it).")
    grad_checkpointing: bool | Literal["auto"] = Field(
        "auto", description="Recompute block activations in backward to save memory; auto: the planner turns it "
                            "on only when the run would not fit without it (off on CPU).")
    checkpoint_layers: int | None = Field(
        None, ge=0, le=COUNT_LIMIT, description="With checkpointing on: how many blocks, counted from the first, recompute their "
                                "activations in backward; the blocks above keep theirs (faster, more memory). "
                                "null = all. Under grad_checkpointing: auto the planner sets it to fill the card "
                                "where blocks run eagerly (compiled blocks recompute none or all).")
    data_parallel: Literal["auto", "ddp", "fsdp"] = Field(
        "auto", description="Under torchrun with several processes: ddp replicates the model on each GPU; fsdp "
                            "shards the base weights (and LoRA) over them with PyTorch FSDP. auto: ddp when the "
                            "planned run fits one GPU, else fsdp.")
    collective_timeout_s: int = Field(
        300, ge=1, le=86_400, description="Under torchrun: seconds a process waits for the others in one "
                                          "collective (starting, a step's gradient sync or FSDP gathers, a "
                                          "checkpoint) before it stops with an error saying another process "
                                          "failed, so a process that died or hangs does not hold the rest. Raise "
                                          "it where rank 0 writes large files alone (full fine-tuning "
                                          "checkpoints on slow storage).")
    tiled_mlp: bool | Literal["auto"] = Field(
        "auto", description="Run each block's MLP over the sequence in checkpointed tiles of 8,192 tokens: far "
                            "less memory at long contexts, for one more MLP forward per step. auto: the planner "
                            "turns it on when full checkpointing alone does not fit.")
    compile: bool | Literal["auto"] = Field(
        "auto", description="Compile each transformer block with torch.compile, which fuses the small operations "
                            "between matmuls (the first steps are slower while it compiles). auto: on a CUDA GPU "
                            "without weight streaming (offload.weights), in every process under torchrun.")
    compile_backend: Literal["inductor", "aot_eager"] = Field(
        "inductor", description="The torch.compile backend of compiled blocks (as TrainingArguments' "
                                "torch_compile_backend): inductor generates the fused kernels, the speedup; "
                                "aot_eager traces each block and its backward the same way but runs them with "
                                "eager kernels: no speedup, for telling a tracing problem from a generated-kernel "
                                "one (and quick to start on a CPU, where inductor compiles C++ with gcc).")
    cuda_graphs: bool | Literal["auto"] = Field(
        "auto", description="Replay each micro-batch's forward and backward as a CUDA graph (one per batch shape, "
                            "captured after two eager runs), removing the per-kernel launch cost that bounds small "
                            "batches. auto: where blocks are compiled, for LoRA methods whose blocks draw no random "
                            "numbers (lora.dropout 0), in one process (not under torchrun: see docs/distributed.md).")
    seed: int = Field(0, ge=0, le=SEED_LIMIT, description="Seed for data order, LoRA init and dropout.")
    log_every: int = Field(1, ge=1, le=COUNT_LIMIT, description="Write a metrics.jsonl line every N optimizer steps.")
    max_nonfinite_steps: int = Field(10, ge=1, le=COUNT_LIMIT, description="Stop after this many consecutive steps with a "
                                     "non-finite loss or gradient (each is skipped, not applied).")

    @field_validator("micro_batch")
    @classmethod
    def _at_least_one_row(cls, value: int | str) -> int | str:
        if value != "auto" and not 1 <= value <= COUNT_LIMIT:
            raise ValueError(f"Input should be greater than or equal to 1 and at most {COUNT_LIMIT}, or auto")
        return value

    @model_validator(mode="after")
    def _rows_per_step_is_one_number(self) -> "TrainConfig":
        if self.micro_batch == "auto":
            if self.rows_per_step is None:
                raise ValueError("micro_batch: auto splits train.rows_per_step; set rows_per_step (sequences per "
                                 "optimizer step)")
            return self
        if self.rows_per_step is None:
            return self
        if "grad_accum" not in self.model_fields_set and self.rows_per_step % self.micro_batch == 0:
            # a number for micro_batch on a recipe that gives rows_per_step: accumulate up to those rows
            self.__dict__["grad_accum"] = self.rows_per_step // self.micro_batch
        if self.rows_per_step != self.micro_batch * self.grad_accum:
            raise ValueError(f"rows_per_step={self.rows_per_step} is not micro_batch x grad_accum "
                             f"({self.micro_batch} x {self.grad_accum}); set micro_batch: auto to let the planner "
                             f"split it, or rows_per_step: null")
        return self

    @property
    def step_rows(self) -> int:
        """Sequences per optimizer step in one process, however they are split."""
        return self.rows_per_step if self.micro_batch == "auto" else self.micro_batch * self.grad_accum


class OffloadConfig(_Section):
    embeddings: bool | Literal["auto"] = Field(
        "auto", description="Keep the frozen input-embedding table in host memory and look up each batch's rows "
                            "there (Llama-3.1-8B: 1 GiB less on the GPU, 16 MB copied per 2,048 tokens). Only for "
                            "embeddings that are frozen and not tied to the output head, one GPU or DDP. auto: when "
                            "the run does not fit otherwise (the cheapest offload).")
    activations: bool | Literal["auto"] = Field(
        "auto", description="Keep what backward needs from the forward (with checkpointing: each block's input) in "
                            "pinned CPU memory, copied out and back on a side stream. auto: when the run does not "
                            "fit otherwise.")
    weights: bool | Literal["auto"] = Field(
        "auto", description="Keep the frozen block weights in pinned CPU memory and bring one block (and the next) "
                            "to the GPU at a time, for models whose weights do not fit the card. qlora, lora, "
                            "freeze; needs checkpointing. auto: when nothing else fits.")


class SaveConfig(_Section):
    every_steps: int = Field(100, ge=1, le=COUNT_LIMIT, description="Write a checkpoint every N optimizer steps.")
    keep: int = Field(2, ge=1, le=COUNT_LIMIT, description="Keep the newest N checkpoints.")


class EvalConfig(_Section):
    every_steps: int | None = Field(None, ge=1, le=COUNT_LIMIT, description="Also measure held-out loss every N steps (null: only before and after).")
    max_batches: int | None = Field(None, ge=1, le=COUNT_LIMIT, description="Evaluate on at most this many held-out batches.")
    batch_size: int = Field(4, ge=1, le=COUNT_LIMIT, description="Most sequences per evaluation forward pass (fewer where they would "
                                                "hold more tokens than a training micro-batch).")


class WandbConfig(_Section):
    project: str = Field("snugtune", description="Weights & Biases project.")
    entity: str | None = Field(None, description="Team or user (null: the account's default).")
    name: str | None = Field(None, description="Run name (null: the run directory's name).")
    mode: Literal["offline", "online"] = Field("offline", description="offline: written under RUN_DIR/wandb only "
                                               "(`wandb sync` uploads it later); online: sent to the server as it runs.")


class MlflowConfig(_Section):
    tracking_uri: str | None = Field(None, description="Where runs are stored: an MLflow server URL, sqlite:///FILE or "
                                     "file:DIR (null: sqlite:///RUN_DIR/mlflow.db, local).")
    experiment: str = Field("snugtune", description="Experiment name (created when missing).")
    run_name: str | None = Field(None, description="Run name (null: the run directory's name).")


def _true_is_defaults(value):
    """`wandb: true` turns a tracker on with its defaults, `false` turns it off."""
    return {} if value is True else None if value is False else value


class LogConfig(_Section):
    tensorboard: bool = Field(False, description="Also write metrics as TensorBoard event files in RUN_DIR/tensorboard.")
    wandb: WandbConfig | None = Field(None, description="Also log metrics to Weights & Biases (true or settings; "
                                      "needs the snugtune[wandb] extra).")
    mlflow: MlflowConfig | None = Field(None, description="Also log metrics and the config to MLflow (true or "
                                        "settings; needs the snugtune[mlflow] extra).")

    _trackers_from_bools = field_validator("wandb", "mlflow", mode="before")(_true_is_defaults)


PREFERENCE_FIELD_OBJECTIVES = {  # the objectives each preference field applies to (validated below)
    "beta": ("dpo", "orpo", "kto"), "loss_type": ("dpo",), "label_smoothing": ("dpo",),
    "desirable_weight": ("kto",), "undesirable_weight": ("kto",), "prompt_nll": ("orpo",)}


class PreferenceConfig(_Section):
    beta: float = Field(0.1, gt=0, description="dpo, kto: how far the policy may move from the reference (higher: "
                        "less); orpo: the weight of the odds-ratio term (ORPO's lambda). TRL's default 0.1.")
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = Field(
        "sigmoid", description="dpo: sigmoid (the DPO paper's), ipo (squared, per-token log-ratios; beta is its "
                               "tau), hinge (SLiC), robust (rDPO: preferences flipped with probability "
                               "label_smoothing).")
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="dpo with loss_type robust: the chance that a "
                                   "pair's preference is flipped (the rDPO paper suggests 0.1).")
    desirable_weight: float = Field(1.0, gt=0, description="kto: weight of the desirable rows' loss (raise it when "
                                    "they are fewer than the undesirable ones).")
    undesirable_weight: float = Field(1.0, gt=0, description="kto: weight of the undesirable rows' loss.")
    prompt_nll: bool = Field(True, description="orpo: the NLL term covers the prompt tokens of the chosen sequence "
                             "too, as TRL's ORPOTrainer and the ORPO authors' code do; false: the answer only.")


class Config(_Section):
    model: Text = Field("smollm2-135m-instruct", description="Built-in name, shape:NAME, local HF folder, .gguf file or hub id.")
    data: DataConfig
    max_seq_len: int = Field(512, ge=8, le=COUNT_LIMIT, description="Longest sample in tokens.")
    method: Literal["lora", "qlora", "lora-8bit", "freeze", "full"] = Field("lora", description="What is trained and how the base is stored.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA shape (lora, qlora, lora-8bit).")
    quant: QuantConfig = Field(default_factory=QuantConfig, description="Base-weight quantization (qlora, lora-8bit).")
    freeze: FreezeConfig = Field(default_factory=FreezeConfig, description="Settings for method=freeze.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Optimization.")
    offload: OffloadConfig = Field(default_factory=OffloadConfig, description="CPU offload when the card is too small.")
    save: SaveConfig = Field(default_factory=SaveConfig, description="Checkpointing.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Held-out evaluation.")
    log: LogConfig = Field(default_factory=LogConfig, description="Where metrics go besides metrics.jsonl.")
    budget: Text = Field("auto", max_length=64, description="Memory budget: auto (the card present), a card name (t4, rtx3080, ...) or NGiB.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when a GPU is present, else cpu.")
    output_dir: Text = Field("runs/run", description="Run directory, relative to the current directory (~ is the "
                             "home folder).")
    trust_remote_code: bool = Field(False, description="Allow a hub model's own Python code to run (off by default).")
    allow_pickle_weights: bool = Field(False, description="Load .bin/.pt (pickle) weights; off: safetensors or GGUF only.")
    objective: Literal["sft", "dpo", "orpo", "kto"] = Field(
        "sft", description="How the model is trained: sft (answers as targets), dpo (preference pairs, against the "
                           "base as reference), orpo (pairs, no reference), kto (answers labelled good or bad).")
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig,
                                         description="Parameters of objective dpo, orpo or kto (TRL's defaults).")

    @field_validator("budget")
    @classmethod
    def _card_or_size(cls, value: str) -> str:
        if value != "auto":  # every command that plans refuses the rest; refused here, before any work
            try:
                budget_bytes(value)
            except ConfigError as err:
                raise ValueError(str(err).removeprefix("budget: ")) from None
        return value

    @field_validator("output_dir")
    @classmethod
    def _home_folder(cls, value: str) -> str:
        return os.path.expanduser(value)  # as a shell would: `~/runs/x` is not a folder named ~

    @model_validator(mode="after")
    def _quant_matches_method(self) -> "Config":
        implied = METHODS[self.method].base_bits
        if self.quant.bits is not None and self.quant.bits != implied:
            raise ValueError(f"quant.bits={self.quant.bits} does not match method={self.method} "
                             f"(qlora is 4-bit, lora-8bit is 8-bit, other methods are not quantized)")
        return self

    @model_validator(mode="after")
    def _streaming_needs_checkpointing(self) -> "Config":
        if self.offload.weights is True:
            if not METHODS[self.method].streams_weights:
                raise ValueError(f"offload.weights streams frozen 4-bit or 16-bit block weights: not for "
                                 f"method={self.method}")
            if self.train.grad_checkpointing is False or self.train.checkpoint_layers is not None:
                raise ValueError("offload.weights needs train.grad_checkpointing on every block (true or auto)")
        return self

    @model_validator(mode="after")
    def _fsdp_shards_what_it_can(self) -> "Config":
        if self.train.data_parallel != "fsdp":
            return self
        if not METHODS[self.method].shards_with_fsdp:
            sharded = ", ".join(name for name, m in METHODS.items() if m.shards_with_fsdp)
            raise ValueError(f"train.data_parallel: fsdp trains {sharded}, not method={self.method} (or use "
                             f"data_parallel: ddp)")
        if self.offload.weights is True:
            raise ValueError("train.data_parallel: fsdp does not combine with offload.weights (or use "
                             "data_parallel: ddp)")
        return self

    @model_validator(mode="after")
    def _preference_fits_objective(self) -> "Config":
        for name, applies in PREFERENCE_FIELD_OBJECTIVES.items():
            # a default is no choice (a run's saved config.yaml spells out every field)
            if getattr(self.preference, name) != PreferenceConfig.model_fields[name].default and \
                    self.objective not in applies:
                raise ValueError(f"preference.{name} applies to objective: {' or '.join(applies)} (objective is "
                                 f"{self.objective})")
        if self.preference.label_smoothing > 0 and self.preference.loss_type != "robust":
            raise ValueError("preference.label_smoothing is robust DPO's flip rate: set preference.loss_type: robust")
        return self

    @model_validator(mode="after")
    def _prompts_are_not_trained_under_preference(self) -> "Config":
        if self.objective != "sft" and self.data.train_on_prompt:
            raise ValueError(f"data.train_on_prompt applies to objective: sft (objective is {self.objective}; ORPO's "
                             f"NLL term covers the prompt with preference.prompt_nll)")
        return self

    @property
    def uses_lora(self) -> bool:
        return METHODS[self.method].adapters

    @property
    def micro_batch_tokens(self) -> int | None:
        """Tokens a training micro-batch holds at most (None while micro_batch is still auto): what a held-out
        batch may hold, so that evaluation needs no more memory than the planned step."""
        return self.train.micro_batch * self.max_seq_len if isinstance(self.train.micro_batch, int) else None


# ---------------------------------------------------------------------------------------------
# Loading: every input bounded (file size, nesting, YAML alias expansion), every quoted value short

CONFIG_MAX_BYTES = 1 << 20  # a config is a few KiB: a larger file is a data file passed by mistake
CONFIG_MAX_VALUES = 100_000  # values once YAML aliases are expanded; a config spelled out in full has ~150
QUOTE_CHARS = 80  # the most of any one value an error line quotes


def shorten(text: str, limit: int = QUOTE_CHARS) -> str:
    """text cut to `limit` characters, saying how long it was: an error line never echoes a huge value."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def safe_yaml(text: str, source: str) -> Any:
    """yaml.safe_load, bounded: invalid YAML, nesting too deep and aliases that expand past CONFIG_MAX_VALUES
    values (a billion-laughs file) are each a ConfigError naming `source` (and the line where YAML says)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{source}{where}: not valid YAML ({shorten(str(getattr(exc, 'problem', exc)))})") from None
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply to be a config") from None
    check_expansion(value, source)
    return value


def check_expansion(value: Any, source: str) -> None:
    """ConfigError when `value` (parsed YAML, where an alias is one shared object) holds more than
    CONFIG_MAX_VALUES values once expanded, or refers to itself: nothing downstream walks a bomb."""
    sizes: dict[int, int] = {}  # id of a list or mapping -> values in it, expanded (each counted once)
    open_ids: set[int] = set()

    def count(item: Any) -> int:
        if not isinstance(item, (dict, list)):
            return 1
        if id(item) in sizes:
            return sizes[id(item)]
        if id(item) in open_ids:
            raise ConfigError(f"{source}: a YAML alias refers to itself (a value inside its own anchor)")
        open_ids.add(id(item))
        total = 1 + sum(count(child) for child in (item.values() if isinstance(item, dict) else item))
        open_ids.discard(id(item))
        sizes[id(item)] = total
        return total
    try:
        total = count(value)
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply to be a config") from None
    if total > CONFIG_MAX_VALUES:
        raise ConfigError(f"{source}: YAML aliases expand to {total:,} values (at most {CONFIG_MAX_VALUES:,}); "
                          f"write the config out without aliases (&name, *name)")


def _parse_value(text: str) -> Any:
    """Parse an override value the way YAML would (numbers, booleans, lists, null); `key=` is an empty string
    (null is `key=null`)."""
    if not text:
        return ""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    except RecursionError:
        raise ConfigError(f"override value {shorten(text)!r}: nested too deeply") from None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `a.b=value` overrides to a raw config dict (in place) and return it."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{shorten(item)}' is not key=value (example: train.lr=1e-4)")
        key, value = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override '{shorten(item)}': the key has an empty part (example: train.lr=1e-4)")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{shorten(item)}': '{shorten(part)}' is not a section")
        node[parts[-1]] = _parse_value(value)
    return raw


# Names other fine-tuning tools use for our fields, so their users get a useful suggestion.
_OTHER_TOOLS_NAMES = {
    "learning_rate": "lr", "batch_size": "micro_batch", "per_device_train_batch_size": "micro_batch",
    "micro_batch_size": "micro_batch", "gradient_accumulation_steps": "grad_accum", "num_train_epochs": "epochs",
    "num_epochs": "epochs", "lora_r": "r", "rank": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
    "target_modules": "targets", "lora_target_modules": "targets", "gradient_checkpointing": "grad_checkpointing",
    "lr_scheduler_type": "scheduler", "lr_scheduler": "scheduler", "warmup_ratio": "warmup",
    "warmup_steps": "warmup", "optim": "optimizer", "sequence_len": "max_seq_len", "max_length": "max_seq_len",
    "cutoff_len": "max_seq_len", "base_model": "model", "save_steps": "every_steps", "output": "output_dir",
    # preference training: TRL, Axolotl (rl, rl_beta) and LLaMA-Factory (stage, pref_beta, pref_loss, kto_*)
    "rl": "objective", "stage": "objective", "rl_beta": "preference.beta", "pref_beta": "preference.beta",
    "dpo_beta": "preference.beta", "pref_loss": "preference.loss_type", "dpo_label_smoothing": "label_smoothing",
    "kto_chosen_weight": "desirable_weight", "kto_rejected_weight": "undesirable_weight",
    "kto_desirable_weight": "desirable_weight", "kto_undesirable_weight": "undesirable_weight",
}


def _known_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names valid at `loc` (the parent of an unknown key)."""
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None:
            return []
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        else:
            return []
    return list(model.model_fields)


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line naming the field and what is wrong, with a suggestion for misspelled keys; values (and keys)
    are quoted cut short."""
    first = err.errors()[0]
    loc = tuple(first["loc"])
    field = shorten(".".join(str(p) for p in loc)) or "(top level)"
    if first["type"] == "extra_forbidden":
        valid = _known_keys(Config, loc[:-1])
        alias = _OTHER_TOOLS_NAMES.get(str(loc[-1]))
        close = [alias] if alias in valid or (alias or "").split(".")[0] in valid else \
            difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
        hint = f"; did you mean '{'.'.join(map(str, loc[:-1] + (close[0],)))}'?" if close else \
            f"; valid keys here: {', '.join(valid)}"
        return f"{source}: unknown key '{field}'{hint}"
    if first["type"] == "missing":
        return f"{source}: missing required key '{field}'"
    message = shorten(first["msg"].removeprefix("Value error, "), 4 * QUOTE_CHARS)
    got = first.get("input")
    shown = "" if isinstance(got, dict) or got is None else f" (got {shorten(repr(got))})"
    return f"{source}: {field}: {message}{shown}"


def _read_config_text(path: Path) -> str:
    """The config file's text, refused when it is not a regular file, over CONFIG_MAX_BYTES or not UTF-8."""
    if not path.is_file():
        what = "not a regular file (a folder, a pipe or a device)" if path.exists() else "config file not found"
        raise ConfigError(f"{path}: {what}")
    try:
        with path.open("rb") as handle:
            data = handle.read(CONFIG_MAX_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if len(data) > CONFIG_MAX_BYTES:
        raise ConfigError(f"{path}: over {CONFIG_MAX_BYTES // 2**20} MiB, too large for a config; pass the YAML "
                          f"config (data files go in data.path)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); pass the YAML config") from None


def read_config_mapping(path: Path) -> dict:
    """A config file's top-level mapping, unvalidated; ConfigError naming the file when it is not one."""
    raw = safe_yaml(_read_config_text(path), str(path)) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level")
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML config, apply overrides, validate. Relative data paths resolve against the file.

    Raises ConfigError with a one-line message on any problem.
    """
    path = Path(path).expanduser()
    raw = read_config_mapping(path)
    apply_overrides(raw, overrides or [])
    check_expansion(raw, f"{path} with the overrides")
    config = config_from_dict(raw, source=str(path))
    config.data.path = _resolve_data_path(config.data.path, path.parent)
    template = config.data.chat_template
    if template and template.endswith(".jinja"):
        config.data.chat_template = str((path.parent / Path(template).expanduser()).resolve())
    return config


_DATASET_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_dataset_id(path: str) -> bool:
    """owner/name, and not a data file someone mistyped."""
    return bool(_DATASET_ID.match(path)) and not path.lower().endswith((".jsonl", ".json", ".csv", ".parquet", ".txt"))


def _resolve_data_path(value: str, config_dir: Path) -> str:
    """A local path resolves against the config's folder; a hub dataset id (owner/name) that names no local
    file stays as it is."""
    local = (config_dir / Path(value).expanduser()).resolve()
    return value if not local.exists() and looks_like_dataset_id(value) else str(local)


def config_from_dict(raw: dict, source: str = "config") -> Config:
    """Validate a plain dict into a Config (ConfigError on failure)."""
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def config_to_yaml(config: Config) -> str:
    """The resolved config as YAML, every field spelled out."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


# The fields the planner decides, listed once: config field -> (the planner's Decisions field it is set from,
# whether a change to it needs a new model rather than another split of the rows or no CUDA graphs). The
# planner writes them into the Config a run trains with (planner.plan.resolved_config).
PLANNED_FIELDS: dict[str, tuple[str, bool]] = {
    "train.micro_batch": ("micro_batch", False),
    "train.grad_accum": ("grad_accum", False),
    "train.cuda_graphs": ("cuda_graphs", False),
    "train.grad_checkpointing": ("grad_checkpointing", True),
    "train.checkpoint_layers": ("checkpointed_layers", True),
    "train.tiled_mlp": ("tiled_mlp", True),
    "train.compile": ("compiled_blocks", True),
    "train.data_parallel": ("data_parallel", True),
    "train.optimizer": ("optimizer", True),
    "offload.embeddings": ("embeddings_on_host", True),
    "offload.activations": ("offload_activations", True),
    "offload.weights": ("stream_weights", True),
    "quant.dense_copy": ("dense_copy", True),
}
# Fields that may change between a run and its resumption without changing what is trained: every planned
# field but the optimizer (another optimizer's state does not load). How a step's rows are split into
# micro-batches may change (the planner does, after an OOM) as long as the rows per optimizer step,
# micro_batch x grad_accum x processes, stay the same (checked when resuming).
RESUME_SAFE_FIELDS = (set(PLANNED_FIELDS) - {"train.optimizer"}) | {
    "train.rows_per_step", "save.every_steps", "save.keep", "train.log_every", "train.max_nonfinite_steps",
    "train.collective_timeout_s", "train.compile_backend",
    "eval.max_batches", "eval.batch_size", "eval.every_steps", "log.tensorboard", "output_dir", "device"}
# Where metrics are sent does not change what is trained (a resumed run replays its kept rows to the trackers).
RESUME_SAFE_FIELDS |= {f"log.{name}{key}" for name, section in (("wandb", WandbConfig), ("mlflow", MlflowConfig))
                       for key in ("", *(f".{field}" for field in section.model_fields))}
# Fields that extend (or shorten) a run: allowed, and the LR schedule is recomputed over the new length.
RESUME_LENGTH_FIELDS = {"train.max_steps", "train.epochs"}


def _flatten(value: dict, prefix: str = "") -> dict:
    flat = {}
    for key, item in value.items():
        if isinstance(item, dict):
            flat.update(_flatten(item, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = item
    return flat


def changed_fields(saved_yaml: str, config: Config) -> list[str]:
    """Dotted names of the fields whose value differs between a saved config (YAML) and `config`."""
    old = _flatten(safe_yaml(saved_yaml, "the checkpoint's config.yaml") or {})
    new = _flatten(config.model_dump(mode="json"))
    return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
