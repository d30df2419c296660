"""End to end on the tiny Qwen-Image: the demo recipe trains, resumes exactly, validates, and runs under torchrun
with DDP and with the _fsdp_train.py swap (prompts embedded on the fly by PretrainedQwenImageTextEncoder)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import read_checkpoint_group
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_distributed import common, worker

from arcflow.cli import main
from arcflow.images import GRID_INFO_KEY

DEMO = "configs/demo/arcqwen_tiny_2nfe.py"
REPO = Path(__file__).resolve().parents[1]


def train(work_dir: Path, tiny: Path, **extra) -> list[dict]:
    options = {"model.pretrained": str(tiny), "data.cache": "never", "train_cfg.batch_size": 2,
               "val_cfg.num_prompts": 2, "val_cfg.teacher_steps": 4, "eval_interval": 0, "save_interval": 1000,
               **extra}
    main(["train", str(REPO / DEMO), "--work-dir", str(work_dir), "--cfg-options",
          *[f"{k}={v}" for k, v in options.items()]])
    return [json.loads(line) for line in (work_dir / "metrics.jsonl").read_text().splitlines()]


def test_resume_is_exact_and_validation_grids_are_written(tiny_qwen_dir, tmp_path):
    straight = train(tmp_path / "straight", tiny_qwen_dir, total_iters=2, eval_interval=2, save_interval=2)
    first = train(tmp_path / "split", tiny_qwen_dir, total_iters=1, save_interval=1)
    resumed = train(tmp_path / "split", tiny_qwen_dir, total_iters=2, save_interval=2)
    assert [r["iter"] for r in resumed] == [1, 2]
    assert first[0]["loss"] == straight[0]["loss"] and resumed[1]["loss"] == straight[1]["loss"]
    a = read_checkpoint_group(tmp_path / "straight" / "checkpoints" / "iter_0000002", "ema")
    b = read_checkpoint_group(tmp_path / "split" / "checkpoints" / "iter_0000002", "ema")
    assert a and all(torch.equal(a[k], b[k]) for k in a)
    assert any(".txt_mlp." in k for k in a) and any("heads" in k or "proj_out.student" in k for k in a)

    run = tmp_path / "straight"
    for it in (0, 2):
        folder = run / "val" / f"iter_{it:07d}"
        metrics = json.loads((folder / "metrics.json").read_text())["metrics"]
        assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values()) and "student_2nfe/psnr" in metrics
        with Image.open(folder / "grid.png") as grid:
            layout = json.loads(grid.text[GRID_INFO_KEY])
        assert layout["column_labels"] == ["teacher 4-step", "student 2-NFE", "teacher 2-step Euler"]
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert [image.step for image in events.Images("val/grid")] == [0, 2]
    log = (run / "train.log").read_text()
    assert "text encoder PretrainedQwenImageTextEncoder on the fly" in log
    assert json.loads((run / "checkpoints" / "iter_0000002" / "state.json").read_text())["trained_with"][
        "max_sequence_length"] == 32


def _fsdp_copy(tmp_path: Path) -> Path:
    """configs/ copied with the seed's switch applied to the demo leaf: './_ddp_train.py' -> './_fsdp_train.py'."""
    root = tmp_path / "configs"
    shutil.copytree(REPO / "configs", root)
    leaf = root / "demo" / Path(DEMO).name
    text = leaf.read_text()
    assert "'./_ddp_train.py'" in text
    leaf.write_text(text.replace("'./_ddp_train.py'", "'./_fsdp_train.py'"))
    return leaf


def test_ddp_and_fsdp_swap_on_two_ranks_give_the_same_update(tiny_qwen_dir, tmp_path):
    options = common(tiny_qwen_dir, total_iters=2, **{"train_cfg.batch_size": 1, "save_interval": 2})
    ddp = worker(2, tmp_path / "ddp", options, config=DEMO)
    fsdp = worker(2, tmp_path / "fsdp", options, config=_fsdp_copy(tmp_path))
    assert ddp["ranks"][0] == ddp["ranks"][1]  # DDP keeps the replicas identical
    for a, b in zip(ddp["metrics"], fsdp["metrics"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    for name, (total, l1) in ddp["ranks"][0].items():
        assert fsdp["ranks"][0][name][0] == pytest.approx(total, rel=1e-4, abs=1e-5), name
        assert fsdp["ranks"][0][name][1] == pytest.approx(l1, rel=1e-4, abs=1e-5), name
    assert (tmp_path / "fsdp" / "checkpoints" / "iter_0000002").is_dir()
