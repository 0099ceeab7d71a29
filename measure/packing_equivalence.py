"""Packed vs padded batches on the same samples: the same mean loss (within bf16 noise).

  python measure/packing_equivalence.py CONFIG.yaml [key=value ...]

Loads the config's model for its method (QLoRA etc.), scores every training sample once in
pad-to-longest micro-batches and once in packed rows, and prints both token-weighted mean losses.
"""

import json
import sys

from snugtune.config import load_config
from snugtune.data.batches import collate, collate_packed, micro_batches
from snugtune.data.prepare import prepare_data
from snugtune.loss import mean_loss
from snugtune.precision import resolve_device, resolve_precision
from snugtune.models.load import load_base_model, load_tokenizer, prepare_for_training
from snugtune.models.resolve import resolve_model

cfg = load_config(sys.argv[1], sys.argv[2:])
device = resolve_device(cfg.device)
precision = resolve_precision(cfg.train.precision, device)
path = resolve_model(cfg.model).path
tokenizer = load_tokenizer(path)
data = prepare_data(cfg.data, tokenizer, cfg.max_seq_len, cfg.train.seed)
model = prepare_for_training(load_base_model(path, cfg, device, precision.compute_dtype), cfg)
padded = [collate([row[0] for row in rows], tokenizer.pad_token_id)
          for rows in micro_batches(data.train, cfg.train.micro_batch, 0, 0)]
packed = [collate_packed(rows, tokenizer.pad_token_id)
          for rows in micro_batches(data.train, cfg.train.micro_batch, 0, 0, packed_len=cfg.max_seq_len)]
loss_padded, n_padded = mean_loss(model, padded, precision, device)
loss_packed, n_packed = mean_loss(model, packed, precision, device)
print(json.dumps({"model": cfg.model, "precision": precision.name, "samples": len(data.train),
                  "padded": {"mean_loss": loss_padded, "tokens_scored": n_padded, "batches": len(padded),
                             "positions": sum(b["input_ids"].numel() for b in padded)},
                  "packed": {"mean_loss": loss_packed, "tokens_scored": n_packed, "batches": len(packed),
                             "positions": sum(b["input_ids"].numel() for b in packed)},
                  "relative_difference": abs(loss_packed - loss_padded) / loss_padded}, indent=2))
