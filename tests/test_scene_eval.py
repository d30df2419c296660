"""The held-out scene table: reference row, MSE against the reference, detector fields."""

from pathlib import Path

import pytest
import torch

from arcflow.config import load_config, torch_dtype
from arcflow.demo.scene_eval import REFERENCE_STEPS, SceneBench, markdown_table
from arcflow.models import build_backbone, build_text_encoder

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench() -> SceneBench:
    cfg = load_config(str(REPO / "configs/demo/teacher_arcflux_2nfe.py"),
                      {"model.pretrained": str(REPO / "assets/demo_teacher")})
    backbone = build_backbone(cfg.model, torch.device("cpu")).eval()
    vae = backbone.load_vae(cfg.model.pretrained, torch_dtype(cfg.model.dtype))
    return SceneBench(backbone, build_text_encoder(cfg.model), vae, num_prompts=6, height=64, width=64,
                      shift=cfg.distill.shift, batch_size=4)


def test_reference_row_is_exact_and_rows_are_consistent(bench: SceneBench) -> None:
    rows = bench.teacher_rows()
    assert [row["nfe"] for row in rows] == [REFERENCE_STEPS, 2, 4, 8]
    assert rows[0]["latent_mse"] == 0 and rows[0]["psnr"] is None
    for row in rows:
        assert 0 <= row["prompt_accuracy"] <= min(row["colour_accuracy"], row["shape_accuracy"])
    # Fewer Euler steps stray further from the 128-step samples (the teacher's paths are curved).
    assert rows[1]["latent_mse"] > rows[2]["latent_mse"] > rows[3]["latent_mse"] > 0
    table = markdown_table(rows, "test")
    assert table.count("\n| teacher_euler_") == 4 and "inf (reference)" in table


def test_score_measures_against_the_reference(bench: SceneBench) -> None:
    reference = bench.reference["latents"]
    same = bench.score("copy", 1, lambda z, c: reference[_rows(bench, z)])
    offset = bench.score("offset", 1, lambda z, c: reference[_rows(bench, z)] + 0.1)
    assert same["latent_mse"] == 0
    assert offset["latent_mse"] == pytest.approx(0.01, rel=1e-5)
    assert offset["psnr"] is not None and offset["psnr"] > 0
    assert set(bench.images) >= {"copy", "offset"}


def _rows(bench: SceneBench, z: torch.Tensor) -> slice:
    """The batch of held-out scenes that ``z`` (a slice of the bench's noise) belongs to."""
    for begin in range(0, len(bench.noise), bench.batch_size):
        if torch.equal(bench.noise[begin:begin + bench.batch_size], z):
            return slice(begin, begin + len(z))
    raise AssertionError("unknown noise batch")


def test_demo_prints_the_scene_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    from arcflow import cli

    monkeypatch.chdir(REPO)  # the demo config names the shipped teacher relative to the repository
    monkeypatch.setattr(cli, "DEMO_SCENES", 4)
    cli.main(["demo", "--work-dir", str(tmp_path / "run"), "--cfg-options", "total_iters=2", "save_interval=2",
              "eval_interval=2", "train_cfg.batch_size=2"])
    out = capsys.readouterr().out
    assert "| student_2nfe | 2 |" in out  # the validation alignment table
    assert "| arcflow_student_2nfe | 2 |" in out and "| teacher_euler_128step | 128 |" in out
