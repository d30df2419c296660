"""End to end on the tiny FLUX: the commands users type, exact resume, validation, sampling."""

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import read_checkpoint_group
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from arcflow.cli import main
from arcflow.config import load_config
from arcflow.images import GRID_INFO_KEY, grid_cell
from arcflow.method.sampling import sample_teacher
from arcflow.models import build_backbone, build_text_encoder
from arcflow.models.base import pack, unpack

DEMO = "configs/demo/arcflux_tiny_2nfe.py"
REPO = Path(__file__).resolve().parents[1]


def options(tiny: Path, **extra) -> list[str]:
    base = {"model.pretrained": str(tiny), "data.cache": "never", "train_cfg.batch_size": 2, "val_cfg.num_prompts": 2,
            "val_cfg.teacher_steps": 8, "eval_interval": 0, "save_interval": 1000}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def train(work_dir: Path, tiny: Path, **extra) -> list[dict]:
    main(["train", str(REPO / DEMO), "--work-dir", str(work_dir), "--cfg-options", *options(tiny, **extra)])
    return [json.loads(line) for line in (work_dir / "metrics.jsonl").read_text().splitlines()]


def test_teacher_sampler_matches_diffusers_flux_pipeline(tiny_flux_dir):
    cfg = load_config(REPO / DEMO, {"model.pretrained": str(tiny_flux_dir)})
    backbone = build_backbone(cfg.model, torch.device("cpu"))
    cond = build_text_encoder(cfg.model).encode(["a red circle", "two blue squares at the top"])
    noise = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = sample_teacher(backbone, noise, cond, num_steps=6, shift=3.2)

    pipe = FluxPipeline.from_pretrained(tiny_flux_dir)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.2, use_dynamic_shifting=False)
    packed = pipe(prompt_embeds=cond["prompt_embeds"], pooled_prompt_embeds=cond["pooled_prompt_embeds"],
                  latents=pack(noise), height=64, width=64, num_inference_steps=6,
                  sigmas=[1 - i / 6 for i in range(6)], guidance_scale=3.5, output_type="latent").images
    oracle = unpack(packed, 8, 8)[:, 0]
    torch.testing.assert_close(ours, oracle, rtol=1e-4, atol=1e-4)
    assert (ours - noise).abs().mean() > 0.1  # the sampler actually moved


def test_resume_continues_exactly(tiny_flux_dir, tmp_path):
    straight = train(tmp_path / "straight", tiny_flux_dir, total_iters=6)
    first = train(tmp_path / "split", tiny_flux_dir, total_iters=3)
    assert (tmp_path / "split" / "checkpoints" / "iter_0000003" / "state.json").is_file()
    resumed = train(tmp_path / "split", tiny_flux_dir, total_iters=6)
    assert [r["iter"] for r in resumed] == list(range(1, 7))
    assert [r["loss"] for r in first] == [r["loss"] for r in straight[:3]]
    assert [r["loss"] for r in resumed[3:]] == [r["loss"] for r in straight[3:]]
    a = read_checkpoint_group(tmp_path / "straight" / "checkpoints" / "iter_0000006", "ema")
    b = read_checkpoint_group(tmp_path / "split" / "checkpoints" / "iter_0000006", "ema")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_logs_validation_and_sampling_from_a_checkpoint(tiny_flux_dir, tmp_path):
    run = tmp_path / "run"
    records = train(run, tiny_flux_dir, total_iters=4, eval_interval=2, save_interval=2)
    assert {"iter", "loss", "loss_step0", "loss_step1", "teacher_ratio", "lr", "grad_norm", "sec_per_iter",
            "peak_mem_gb"} <= set(records[-1])
    assert records[0]["teacher_ratio"] == 1.0 and records[-1]["teacher_ratio"] < 1.0
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    for it in (0, 2, 4):
        folder = run / "val" / f"iter_{it:07d}"
        metrics = json.loads((folder / "metrics.json").read_text())["metrics"]
        assert {"student_2nfe/latent_mse", "student_2nfe/psnr", "teacher_euler_2step/psnr"} <= set(metrics)
        with Image.open(folder / "grid.png") as grid:
            assert grid.width > 3 * 128 and grid.height > 2 * 128  # 3 columns, 2 prompts
        assert grid_cell(folder / "grid.png", 1, 2).size == (128, 128)
        layout = json.loads(Image.open(folder / "grid.png").text[GRID_INFO_KEY])
        assert layout["column_labels"] == ["teacher 8-step", "student 2-NFE", "teacher 2-step Euler"]
        assert len(layout["row_captions"]) == 2
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert [image.step for image in events.Images("val/grid")] == [0, 2, 4]
    log = (run / "train.log").read_text()
    assert "trainable parameters" in log
    assert "conditioning source: text encoder PretrainedFluxTextEncoder on the fly (data.cache='never')" in log

    # The checkpoint records what the student saw: T5 length 32, the prompt file's sizes, most frequent first.
    rows = [json.loads(line) for line in (REPO / "assets/demo/prompts.jsonl").read_text().splitlines()][:-8]
    counts = Counter((r["height"], r["width"]) for r in rows)
    record = json.loads((run / "checkpoints" / "iter_0000004" / "state.json").read_text())["trained_with"]
    assert record["max_sequence_length"] == 32
    assert sorted(map(tuple, record["resolutions"])) == sorted(counts)
    assert counts[tuple(record["resolutions"][0])] == max(counts.values())

    out = tmp_path / "sample.png"
    main(["sample", str(REPO / DEMO), "--ckpt", str(run), "--prompt", "a red circle", "a blue star",
          "--nfe", "2", "--height", "64", "--width", "96", "--out", str(out),
          "--cfg-options", f"model.pretrained={tiny_flux_dir}"])
    with Image.open(out) as image:
        assert image.size == (2 * 96, 64)
    with pytest.warns(UserWarning, match="64x96 is not a size it was trained on"):
        main(["sample", str(REPO / DEMO), "--ckpt", str(run), "--prompt", "x", "--height", "64", "--width", "96",
              "--out", str(out), "--cfg-options", f"model.pretrained={tiny_flux_dir}"])
    main(["sample", str(REPO / DEMO), "--ckpt", str(run), "--prompt", "a red circle", "--out", str(out),
          "--cfg-options", f"model.pretrained={tiny_flux_dir}"])
    with Image.open(out) as image:  # left out: the most frequent training size
        assert image.size == tuple(record["resolutions"][0][::-1])


def test_mismatched_checkpoint_is_a_clear_error(tiny_flux_dir, tmp_path):
    train(tmp_path / "run", tiny_flux_dir, total_iters=1, save_interval=1)
    with pytest.raises(ValueError, match="does not match config"):
        main(["sample", str(REPO / DEMO), "--ckpt", str(tmp_path / "run"), "--prompt", "x", "--height", "64",
              "--width", "64", "--out", str(tmp_path / "x.png"),
              "--cfg-options", f"model.pretrained={tiny_flux_dir}", "model.lora_rank=4"])


def test_tools_train_entry_point(tiny_flux_dir, tmp_path):
    cmd = [sys.executable, "tools/train.py", DEMO, "--work-dir", str(tmp_path / "run"), "--launcher", "pytorch",
           "--diff_seed", "--cfg-options", *options(tiny_flux_dir, total_iters=1)]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0",
                                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29788"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "run" / "checkpoints" / "iter_0000001").is_dir()


def test_micro_batches_give_the_same_update(tiny_flux_dir, tmp_path):
    """grad_accum_batch_size=1 processes the batch one prompt at a time: same losses, gradients and weights,
    at the default LoRA dropout (its masks follow the global sample index, not the micro-batch)."""
    whole = train(tmp_path / "whole", tiny_flux_dir, total_iters=2, save_interval=2)
    micro = train(tmp_path / "micro", tiny_flux_dir, total_iters=2, save_interval=2,
                  **{"train_cfg.grad_accum_batch_size": 1})
    for a, b in zip(whole, micro):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    a = read_checkpoint_group(tmp_path / "whole" / "checkpoints" / "iter_0000002", "model")
    b = read_checkpoint_group(tmp_path / "micro" / "checkpoints" / "iter_0000002", "model")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)
