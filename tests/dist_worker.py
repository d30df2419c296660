"""Run under torchrun by tests/test_distributed.py: train, then report every rank's trainable weights.

    torchrun --nproc_per_node=2 tests/dist_worker.py CONFIG WORK_DIR OUT_JSON key=value ...
"""

import ast
import json
import sys

import torch
import torch.distributed as dist

from arcflow.config import load_config, resolve_dirs
from arcflow.distributed import destroy_distributed, init_distributed
from arcflow.training.trainer import Trainer


def _value(text: str):
    """A Python literal (numbers, True, tuples, ...) or else the string itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def main() -> None:
    config, work_dir, out = sys.argv[1:4]
    options = {k: _value(v) for k, v in (item.split("=", 1) for item in sys.argv[4:])}
    env = init_distributed("pytorch")
    trainer = Trainer(resolve_dirs(load_config(config, options), work_dir), env)
    trainer.fit()
    checksums = {}
    for name, p in trainer.backbone.trainable_named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        checksums[name] = [float(full.double().sum()), float(full.double().abs().sum())]
    gathered = [None] * env.world_size
    dist.all_gather_object(gathered, checksums)
    if env.is_main:
        with open(out, "w") as f:
            json.dump({"ranks": gathered}, f)
    del trainer  # DDP's reducer holds the process group: release it before the group goes
    destroy_distributed()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
