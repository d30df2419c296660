"""Resuming after faults: a damaged latest checkpoint, an interrupted log, a rerun with nothing left to do."""

import json
import random
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

sys.path.insert(0, str(Path(__file__).parent))
from test_damage import flip_byte
from test_train_e2e import train


def test_damaged_latest_checkpoint_resumes_from_the_previous_one(tiny_flux_dir, tmp_path, capsys):
    run = tmp_path / "run"
    train(run, tiny_flux_dir, total_iters=2, save_interval=1, log_interval=1)
    shard = next((run / "checkpoints" / "iter_0000002").glob("*.distcp"))
    flip_byte(shard, random.Random(0))
    with pytest.warns(UserWarning, match=f"'{shard}' is damaged.*resuming from an earlier checkpoint"):
        records = train(run, tiny_flux_dir, total_iters=3, save_interval=1, log_interval=1)
    assert [r["iter"] for r in records] == [1, 2, 3]  # iteration 2 ran twice, is logged once
    assert "resumed from" in (log := (run / "train.log").read_text()) and "iter_0000001 at iteration 1" in log
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]

    capsys.readouterr()
    train(run, tiny_flux_dir, total_iters=3)
    assert "nothing to train: the checkpoint is at iteration 3 and total_iters=3" in capsys.readouterr().err
    assert [json.loads(line)["iter"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
