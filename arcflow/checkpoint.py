"""Checkpoints of the trainable state only, in safetensors + JSON (no pickle), written atomically.

Layout: ``{checkpoint_dir}/iter_0000500/`` with ``model.safetensors`` (trainable weights),
``ema.safetensors``, ``optimizer.safetensors`` (per-parameter state) and ``state.json``
(iteration, schedule, data position, RNG states, optimizer hyper-parameters). The folder
is built under a temporary name and renamed into place, so a folder named ``iter_*``
is always complete; anything else is ignored when looking for the latest.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

_ITER_DIR = re.compile(r"^iter_(\d+)$")
STATE_FILE = "state.json"


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for index, param_state in state["state"].items():
        for key, value in param_state.items():
            if isinstance(value, Tensor):
                tensors[f"{index}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{index}.{key}"] = value
    groups = [{k: v for k, v in g.items()} for g in state["param_groups"]]
    return tensors, {"scalars": scalars, "param_groups": groups}


def _unflatten_optimizer(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for flat, value in list(tensors.items()) + list(meta["scalars"].items()):
        index, key = flat.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state(generator: torch.Generator) -> dict[str, Tensor]:
    states = {"torch_cpu": torch.get_rng_state(), "generator": generator.get_state()}
    if torch.cuda.is_available():
        states["torch_cuda"] = torch.cuda.get_rng_state()
    return states


def set_rng_state(generator: torch.Generator, states: dict[str, Tensor]) -> None:
    torch.set_rng_state(states["torch_cpu"])
    generator.set_state(states["generator"])
    if "torch_cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["torch_cuda"])


def save_checkpoint(checkpoint_dir: str | Path, iteration: int, model: dict[str, Tensor], ema: dict[str, Tensor],
                    optimizer: dict[str, Any], rng: dict[str, Tensor], state: dict[str, Any]) -> Path:
    """Write one checkpoint atomically and return its folder."""
    root = Path(checkpoint_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"iter_{iteration:07d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        cpu = lambda d: {k: v.detach().contiguous().cpu() for k, v in d.items()}  # noqa: E731
        save_file(cpu(model), tmp / "model.safetensors")
        save_file(cpu(ema), tmp / "ema.safetensors")
        opt_tensors, opt_meta = _flatten_optimizer(optimizer)
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        save_file(cpu(rng), tmp / "rng.safetensors")
        meta = {"iteration": iteration, "optimizer": opt_meta, **state}
        (tmp / STATE_FILE).write_text(json.dumps(meta, indent=1))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def list_checkpoints(checkpoint_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _ITER_DIR.match(path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(checkpoint_dir: str | Path) -> Path | None:
    found = list_checkpoints(checkpoint_dir)
    return found[-1][1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run's work/checkpoint dir meaning its latest checkpoint."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    for candidate in (path, path / "checkpoints"):
        latest = latest_checkpoint(candidate)
        if latest is not None:
            return latest
    raise FileNotFoundError(f"no checkpoint at '{path}' (expected an iter_* folder or a run dir holding them)")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read everything back; tensors on CPU."""
    path = Path(path)
    missing = [n for n in ("model.safetensors", "ema.safetensors", "optimizer.safetensors", "rng.safetensors",
                           STATE_FILE) if not (path / n).is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoint '{path}' is incomplete: missing {', '.join(missing)}")
    meta = json.loads((path / STATE_FILE).read_text())
    return {
        "model": load_file(path / "model.safetensors"),
        "ema": load_file(path / "ema.safetensors"),
        "optimizer": _unflatten_optimizer(load_file(path / "optimizer.safetensors"), meta.pop("optimizer")),
        "rng": load_file(path / "rng.safetensors"),
        "state": meta,
    }


def prune_checkpoints(checkpoint_dir: str | Path, keep_last: int, keep_every: int | None) -> None:
    """Delete old checkpoints except the newest ``keep_last`` and multiples of ``keep_every``."""
    found = list_checkpoints(checkpoint_dir)
    recent = {path for _, path in found[-keep_last:]} if keep_last > 0 else set()
    for iteration, path in found:
        if path in recent or (keep_every and iteration % keep_every == 0):
            continue
        shutil.rmtree(path)
