"""Several machines: one job of two torchrun agents (`--nnodes 2 --nproc-per-node 1`, c10d rendezvous), started
on one host as two "nodes" of one process each, gloo on the CPU, each with its own output folder and model
cache. Each process has LOCAL_RANK 0: the global rank decides who writes, and the rows each process trains."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import alpaca_rows, write_jsonl
from gloo_ranks import adapter_gap, assert_trains_like, child_env, finish, free_port, tiny_run
from snugtune.config import config_from_dict
from snugtune.engine.train import train

WRITTEN = ("metrics.jsonl", "summary.json", "adapter_model.safetensors", "checkpoints")  # by global rank 0 only


def _nodes(config: Path, outputs: list[Path]) -> list[subprocess.Popen]:
    """Two torchrun agents of one job on this host, each writing into its own output_dir and building its model
    into its own cache (as two machines without shared storage would)."""
    endpoint = f"127.0.0.1:{free_port()}"
    return [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                              "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "snugtune-test",
                              "-m", "snugtune", "train", str(config), f"output_dir={out}", "--quiet"],
                             env=child_env(XDG_CACHE_HOME=str(out.with_name(out.name + "_cache"))),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for out in outputs]


@pytest.mark.slow
def test_two_nodes_train_like_one_process_and_refuse_a_resume_without_shared_storage(tmp_path):
    raw = tiny_run(write_jsonl(tmp_path / "a.jsonl", alpaca_rows(48)), tmp_path / "unused", max_steps=4,
                   grad_accum=1)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    outputs = [tmp_path / "node_a", tmp_path / "node_b"]
    nodes = _nodes(config, outputs)
    one = {**raw, "output_dir": str(tmp_path / "one"), "train": {**raw["train"], "grad_accum": 2}}
    train(config_from_dict(one), show_progress=False)  # meanwhile: one process, the same rows per step
    for status, stderr in finish(nodes):
        assert status == 0, stderr[-3000:]
    # each "machine" built the model into its own cache, global rank 1's included (whole: its weights too)
    assert all((tmp_path / f"{out.name}_cache" / "snugtune" / "models" / "shape-tiny" / "model.safetensors").is_file()
               for out in outputs)
    writer = [out for out in outputs if (out / "summary.json").is_file()]
    assert len(writer) == 1, outputs  # global rank 0, whichever node it joined as
    other = outputs[1 - outputs.index(writer[0])]
    assert not any((other / name).exists() for name in WRITTEN), list(other.iterdir())
    assert json.loads((writer[0] / "summary.json").read_text())["data_parallel"] == "ddp"
    assert_trains_like(writer[0], tmp_path / "one", 1e-5)
    assert adapter_gap(writer[0], tmp_path / "one") < 1e-5
    # longer, again: rank 0's folder has checkpoints, the other node's none; both refuse rather than diverge
    config.write_text(yaml.safe_dump({**raw, "train": {**raw["train"], "max_steps": 6}}))
    results = finish(_nodes(config, outputs), 600)
    for status, stderr in results:
        assert status != 0 and "output_dir must be one folder every machine sees" in stderr, stderr[-3000:]
