"""Launcher for the gloo tests: one process of a torch.distributed group that trains several runs in turn,
so the group starts (imports, rendezvous) once for many runs. RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT come from the environment, as torchrun sets them.

    python tests/engine/distributed_worker.py RUNS.json      # a JSON list of config dicts
"""

import json
import sys
from pathlib import Path

from snugtune.config import config_from_dict
from snugtune.engine import distributed
from snugtune.engine.train import train


def main(spec: Path) -> None:
    ctx = distributed.context_from_env()
    try:
        for raw in json.loads(spec.read_text()):
            train(config_from_dict(raw), show_progress=False, ctx=ctx)
    finally:
        distributed.stop(ctx)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
