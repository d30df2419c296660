"""Where one ArcFlow training iteration spends its wall time.

Knowing whether the teacher's forwards, the student's backward or the rollout math
dominates decides what to optimise next, so this script times ``Trainer.train_step``
split into components. Package code stays untouched: the timers are attribute patches
on the live trainer (and on ``torch.Tensor.backward``, ``clip_grad_norm_`` and the
trainer module's ``segment_loss``), removed again when measuring ends.

Run from the repository root::

    python benchmarks/iteration_breakdown.py [CONFIG] [--iters N] [--warmup W] [--json PATH]
    python benchmarks/iteration_breakdown.py configs/demo/arcqwen_tiny_2nfe.py   # the Qwen-Image recipe
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator
from unittest import mock

import torch
from mmengine.config import DictAction

import arcflow.training.trainer
from arcflow.cli import TINY_CONFIG
from arcflow.config import load_config, resolve_dirs
from arcflow.distributed import DistEnv
from arcflow.models import get_family, lora_dropout
from arcflow.training.trainer import Trainer

TINY_DIRS = ("data/demo/tiny-flux", "data/demo/tiny-qwen-image")
"""Where the demo configs expect their tiny teachers; only these paths are ever generated."""

TEXT = "data (text encoding or cache read)"
TEACHER = "teacher forwards"
STUDENT_FORWARD = "student forward"
DROPOUT = "LoRA dropout masks (student forward and backward)"
STUDENT_BACKWARD = "student backward"
ROLLOUT = "policy and rollout math"
OPTIMIZER = "optimizer step (+ clip, EMA)"
OTHER = "other"
COMPONENTS = (TEXT, TEACHER, STUDENT_FORWARD, DROPOUT, STUDENT_BACKWARD, ROLLOUT, OPTIMIZER, OTHER)


class ExclusiveTimer:
    """Accumulates each component's *self* time: a region nested in another (a teacher call
    inside ``segment_loss``, the transformer inside ``student_policy``) is charged to itself
    and subtracted from its parent, so components never double-count."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = dict.fromkeys(COMPONENTS, 0.0)
        self._stack: list[list[Any]] = []  # [component, seconds spent in nested regions]

    @property
    def current(self) -> str | None:
        return self._stack[-1][0] if self._stack else None

    def synchronize(self) -> None:
        """CUDA runs asynchronously; without a sync, kernel time lands on whoever waits next."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def region(self, component: str) -> Iterator[None]:
        self.synchronize()
        start = time.perf_counter()
        self._stack.append([component, 0.0])
        try:
            yield
        finally:
            self.synchronize()
            elapsed = time.perf_counter() - start
            _, nested = self._stack.pop()
            self.seconds[component] += elapsed - nested
            if self._stack:
                self._stack[-1][1] += elapsed

    def timed(self, component: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` with every call charged to ``component``."""

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with self.region(component):
                return fn(*args, **kwargs)

        return wrapper

    def reset(self) -> None:
        self.seconds = dict.fromkeys(COMPONENTS, 0.0)


@contextmanager
def instrumented(trainer: Trainer, timer: ExclusiveTimer) -> Iterator[None]:
    """Install the timing wrappers for the duration of the block."""
    backbone = trainer.backbone
    network = backbone._forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        # The transformer runs for the teacher too; there it stays part of the teacher's time.
        if timer.current != ROLLOUT:
            return network(*args, **kwargs)
        with timer.region(STUDENT_FORWARD):
            return network(*args, **kwargs)

    patches = [
        (trainer.data, "next_batch", timer.timed(TEXT, trainer.data.next_batch)),
        (backbone, "teacher_velocity", timer.timed(TEACHER, backbone.teacher_velocity)),
        # student_policy's own time (splitting the head output into a policy) is policy math.
        (backbone, "student_policy", timer.timed(ROLLOUT, backbone.student_policy)),
        (backbone, "_forward", forward),
        (arcflow.training.trainer, "segment_loss", timer.timed(ROLLOUT, arcflow.training.trainer.segment_loss)),
        # Making and applying the masks (keys, hashes, the product), in forward and again in backward.
        (lora_dropout, "_row_keys", timer.timed(DROPOUT, lora_dropout._row_keys)),
        (lora_dropout, "_kept", timer.timed(DROPOUT, lora_dropout._kept)),
        (lora_dropout, "apply_mask", timer.timed(DROPOUT, lora_dropout.apply_mask)),
        (torch.Tensor, "backward", timer.timed(STUDENT_BACKWARD, torch.Tensor.backward)),
        (torch.nn.utils, "clip_grad_norm_", timer.timed(OPTIMIZER, torch.nn.utils.clip_grad_norm_)),
        (trainer.optimizer, "step", timer.timed(OPTIMIZER, trainer.optimizer.step)),
        (trainer.optimizer, "zero_grad", timer.timed(OPTIMIZER, trainer.optimizer.zero_grad)),
        (trainer.ema, "update", timer.timed(OPTIMIZER, trainer.ema.update)),
    ]
    if trainer.device.type == "cuda":  # where the masks come from the compiled kernel
        fused = timer.timed(DROPOUT, lora_dropout.drop_fused())
        patches.append((lora_dropout, "drop_fused", lambda: fused))
    with ExitStack() as stack:
        for target, name, wrapper in patches:
            stack.enter_context(mock.patch.object(target, name, wrapper))
        yield


def measure(trainer: Trainer, iters: int, warmup: int) -> tuple[dict[str, float], list[float]]:
    """Mean seconds per iteration of each component over ``iters`` steps after ``warmup`` steps,
    and each measured step's wall time (their spread shows how noisy the machine was)."""
    timer = ExclusiveTimer(trainer.device)
    steps = []
    with instrumented(trainer, timer):
        for _ in range(warmup):
            trainer.train_step()
        timer.reset()
        for _ in range(iters):
            timer.synchronize()
            start = time.perf_counter()
            trainer.train_step()
            timer.synchronize()
            steps.append(time.perf_counter() - start)
    seconds = {name: value / iters for name, value in timer.seconds.items()}
    seconds[OTHER] = sum(steps) / iters - sum(seconds.values())
    return seconds, steps


def machine(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                            "torch": torch.__version__, "python": platform.python_version(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def report(result: dict[str, Any]) -> str:
    """Markdown table of the components plus the totals and the machine they ran on."""
    m, run = result["machine"], result["run"]
    where = f"{m['device']}" + (f" ({m['gpu']})" if "gpu" in m else "")
    lines = [
        f"config: {run['config']}  (batch {run['batch_size']} at {', '.join(run['image_sizes'])}, "
        f"nfe {run['nfe']}, num_states {run['num_states']}, dtype {run['dtype']})",
        f"machine: {m['cpu_count']} CPUs ({m['torch_threads']} torch threads), torch {m['torch']}, device {where}",
        f"{run['iters']} measured iterations after {run['warmup']} warm-up",
        "",
        "| component | ms/iter | share % |",
        "| --- | ---: | ---: |",
    ]
    for name in COMPONENTS:
        lines.append(f"| {name} | {1e3 * result['seconds'][name]:.1f} | {result['share_pct'][name]:.1f} |")
    lines.append(f"| total | {1e3 * result['sec_per_iter']:.1f} | 100.0 |")
    lines.append("")
    steps = result["step_seconds"]
    lines.append(f"sec/iter: {result['sec_per_iter']:.4f} (fastest {min(steps):.4f}, slowest {max(steps):.4f})   "
                 f"iters/s: {result['iters_per_sec']:.3f}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", nargs="?", default=TINY_CONFIG)
    parser.add_argument("--iters", type=int, default=10, help="measured iterations")
    parser.add_argument("--warmup", type=int, default=2, help="iterations run first and not measured")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, default={},
                        help="override config keys, e.g. train_cfg.batch_size=2")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.iters < 1 or args.warmup < 0:
        parser.error("--iters must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device)
    cfg = load_config(args.config, dict(args.cfg_options))
    tiny = cfg.model.pretrained
    if tiny in TINY_DIRS and not Path(tiny, "model_index.json").is_file():
        print(f"making the tiny {cfg.model.backbone} model in {tiny}")
        get_family(cfg.model.backbone).make_tiny(tiny, 0)
    with tempfile.TemporaryDirectory(prefix="arcflow-bench-") as work_dir:
        trainer = Trainer(resolve_dirs(cfg, work_dir), DistEnv(device=device))
        seconds, steps = measure(trainer, args.iters, args.warmup)
        table = trainer.data.table
        sizes = sorted({(int(h), int(w)) for h, w in zip(table.heights, table.widths)})
    sec_per_iter = sum(seconds.values())
    result = {
        "machine": machine(device),
        "run": {"config": str(args.config), "iters": args.iters, "warmup": args.warmup,
                "batch_size": cfg.train_cfg.batch_size, "image_sizes": [f"{h}x{w}" for h, w in sizes],
                "nfe": cfg.distill.nfe, "num_states": cfg.distill.num_states, "dtype": cfg.model.dtype},
        "seconds": seconds,
        "share_pct": {name: 100 * value / sec_per_iter for name, value in seconds.items()},
        "sec_per_iter": sec_per_iter,
        "iters_per_sec": 1 / sec_per_iter,
        "step_seconds": steps,
    }
    print(report(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
