"""What the per-file SHA-256 of a checkpoint costs: measured here, projected for the full-size student.

A checkpoint holds four float32 copies of the trainable set (weights, EMA, Adam's two moments). The
size comes from the family's published transformer config on the meta device (no weights); the
throughputs from a DCP save of ``--mib`` MiB here, its checksums (``write_checksums``, at save) and
their check (``verify_folder``, at load).

    python benchmarks/checksum_cost.py [--config CONFIG] [--mib 512] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

from arcflow.checksums import verify_folder, write_checksums
from arcflow.config import load_config
from arcflow.inference.export import student_ema_shapes
from arcflow.models import get_family

REFERENCE_CONFIG = Path(__file__).resolve().parents[1] / "configs/flux/arcflux_2nfe_k16.py"
COPIES = 4
"""Weights, EMA, exp_avg, exp_avg_sq: float32 each."""


def checkpoint_bytes(config: str | Path) -> tuple[int, int]:
    """(trainable parameters, checkpoint bytes) of the config's full-size student."""
    model = load_config(config).model
    family = get_family(model.backbone)
    with torch.device("meta"):
        transformer = family.backbone.transformer_class(**family.full_size)
    shapes = student_ema_shapes(transformer, model.num_modes, model.lora_rank, family.backbone.lora_targets)
    params = sum(torch.Size(shape).numel() for shape in shapes.values())
    return params, COPIES * 4 * params


def measure(mib: int, where: Path) -> dict[str, float]:
    """GiB/s of a DCP save, of checksumming its files and of verifying them."""
    folder = Path(tempfile.mkdtemp(prefix="checksum_cost.", dir=where))
    try:
        tensor = torch.randn(mib * 2**20 // 4, generator=torch.Generator().manual_seed(0))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            start = time.perf_counter()
            dcp.save({"x": tensor}, checkpoint_id=str(folder))
            save_s = time.perf_counter() - start
        size = sum(p.stat().st_size for p in folder.iterdir()) / 2**30
        start = time.perf_counter()
        write_checksums(folder)
        hash_s = time.perf_counter() - start
        start = time.perf_counter()
        verify_folder(folder, "checkpoint")
        verify_s = time.perf_counter() - start
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {"save_gib_s": size / save_s, "checksum_gib_s": size / hash_s, "verify_gib_s": size / verify_s}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REFERENCE_CONFIG), help="run config of the full-size student")
    parser.add_argument("--mib", type=int, default=512, help="size of the measured save")
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="folder to measure on (its disk counts)")
    args = parser.parse_args(argv)
    params, total = checkpoint_bytes(args.config)
    rates = measure(args.mib, Path(args.dir))
    gib = total / 2**30
    result = {"trainable_params": params, "checkpoint_gib": gib, **rates,
              "projected_save_s": gib / rates["save_gib_s"], "projected_checksum_s": gib / rates["checksum_gib_s"],
              "projected_verify_s": gib / rates["verify_gib_s"],
              "checksum_share_of_save": rates["save_gib_s"] / rates["checksum_gib_s"]}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
