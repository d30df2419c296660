"""Fault injection: a diverging run stops every rank before it saves NaN, and nothing non-finite is written."""

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from arcflow.distributed import DistEnv
from arcflow.training import checkpoint as ckpt
from arcflow.training.guards import Divergence, check_writable, reduce_step
from arcflow.training.trainer import Trainer

sys.path.insert(0, str(Path(__file__).parent))
from test_train_e2e import train


def _all_finite(path: Path) -> bool:
    metadata = ckpt.read_metadata(path)
    tensors = {k: torch.zeros(m.size, dtype=m.properties.dtype) for k, m in metadata.state_dict_metadata.items()}
    nested: dict = {}
    for key, tensor in tensors.items():
        group, name = key.split(".", 1)
        nested.setdefault(group, {})[name] = tensor
    ckpt.load_checkpoint(path, nested)
    return ckpt.first_non_finite(nested) is None


def test_forced_divergence_stops_before_saving_nan(tiny_flux_dir, tmp_path):
    """lr=1e30: the first step is finite, every later one NaN. One skip is allowed (and logged), then it stops."""
    run = tmp_path / "run"
    with pytest.raises(Divergence, match=r"at iteration 2 .*1 such steps skipped"):
        train(run, tiny_flux_dir, total_iters=4, save_interval=1,
              **{"optimizer.lr": 1e30, "train_cfg.skip_non_finite_steps": 1})
    saved = [i for i, _ in ckpt.list_checkpoints(run / "checkpoints")]
    assert saved == [1, 2]  # iteration 2 holds the weights of iteration 1: the NaN update was dropped
    assert all(_all_finite(path) for _, path in ckpt.list_checkpoints(run / "checkpoints"))
    assert "non-finite loss or gradient norm at iteration 1" in (run / "train.log").read_text()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert math.isfinite(records[0]["loss"])


def test_default_stops_at_the_first_non_finite_step():
    trainer = SimpleNamespace(skipped_steps=0, cfg=SimpleNamespace(train_cfg=SimpleNamespace(skip_non_finite_steps=0)))
    with pytest.raises(Divergence, match="at iteration 7 .*skip_non_finite_steps=0"):
        Trainer._skip_non_finite(trainer, 7, [float("nan")], 1.0)


def test_save_refuses_non_finite_and_writes_nothing(tmp_path):
    tensors = {"model": {"w": torch.ones(2)}, "ema": {"w": torch.tensor([1.0, float("inf")])}}
    with pytest.raises(ckpt.NonFiniteCheckpoint, match="'ema.w' on rank 0 holds NaN or infinity"):
        ckpt.save_checkpoint(tmp_path, 3, tensors, {}, DistEnv())
    assert list(tmp_path.iterdir()) == []


def test_pruning_keeps_the_newest_even_with_keep_last_zero(tmp_path):
    for it in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, it, {"model": {"w": torch.ones(2)}}, {}, DistEnv())
    ckpt.prune_checkpoints(tmp_path, keep_last=0, keep_every=None)
    assert [i for i, _ in ckpt.list_checkpoints(tmp_path)] == [3]


def _rank_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    env = DistEnv(rank=rank, world_size=2)
    losses = torch.tensor([1.0, float("nan") if rank == 1 else 2.0], dtype=torch.float64)
    _, finite = reduce_step(losses, torch.tensor(3.0), env)
    _, norm_finite = reduce_step(torch.ones(2, dtype=torch.float64), torch.tensor(float("inf") if rank else 1.0), env)
    w = torch.tensor([float("nan")]) if rank == 1 else torch.ones(1)
    try:
        ckpt.save_checkpoint(out_dir, 1, {"model": {f"w{rank}": w}}, {}, env)
        refused = ""
    except ckpt.NonFiniteCheckpoint as err:
        refused = str(err)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps([finite, norm_finite, refused]))
    dist.destroy_process_group()


def test_non_finite_on_one_rank_stops_every_rank(tmp_path):
    fork = mp.get_context("fork")  # no re-import of this module in the children: seconds, not a minute
    workers = [fork.Process(target=_rank_worker, args=(r, str(tmp_path / "init"), str(tmp_path))) for r in (0, 1)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert [w.exitcode for w in workers] == [0, 0]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r[:2] for r in results] == [[False, False], [False, False]]
    assert "another rank" in results[0][2] and "'model.w1' on rank 1" in results[1][2]
    assert not any(p.name.startswith(("iter_", ".iter_")) for p in tmp_path.iterdir())


def test_unwritable_work_dir_is_found_before_the_model_loads(tiny_flux_dir, tmp_path):
    """A folder that cannot be created (a file in the way; root ignores permission bits) fails at start."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(PermissionError, match=f"work dir '{blocker / 'run'}' is not writable"):
        train(blocker / "run", tiny_flux_dir, total_iters=1)
    with pytest.raises(PermissionError, match=f"checkpoint dir '{blocker / 'ckpt'}' is not writable"):
        check_writable(blocker / "ckpt", "checkpoint dir")


def test_a_failing_save_names_the_path_and_leaves_nothing(tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, 1, {"model": {"w": torch.ones(2)}}, {}, DistEnv())

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt.dcp, "save", disk_full)
    with pytest.raises(OSError, match=rf"cannot write checkpoint '{tmp_path}/.iter_0000002.partial'.*No space left"):
        ckpt.save_checkpoint(tmp_path, 2, {"model": {"w": torch.ones(2)}}, {}, DistEnv())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000001"]
