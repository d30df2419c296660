"""The benchmark scripts run end to end and print self-consistent figures."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import re
from types import ModuleType

import pytest
import torch
from diffusers import FluxTransformer2DModel

from arcflow.cli import TINY_CONFIG
from arcflow.config import ModelConfig
from arcflow.models.flux.backbone import FluxBackbone

REPO = pathlib.Path(__file__).resolve().parents[1]
ROW = re.compile(r"^\| (.+?) \| ([\d,.]+) \| ([\d.]+) \|$", re.MULTILINE)


def load_script(name: str) -> ModuleType:
    """benchmarks/ holds scripts, not a package: import one by path."""
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def table_rows(text: str) -> dict[str, tuple[float, float]]:
    return {name: (float(a.replace(",", "")), float(b)) for name, a, b in ROW.findall(text)}


@pytest.fixture(scope="module")
def breakdown() -> ModuleType:
    return load_script("iteration_breakdown")


@pytest.fixture(scope="module")
def param_count() -> ModuleType:
    return load_script("param_count")


def test_iteration_breakdown_shares_add_up(breakdown, tiny_flux_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)  # the demo config names its prompt file relative to the repository
    backward = torch.Tensor.backward
    json_path = tmp_path / "breakdown.json"
    result = breakdown.main([TINY_CONFIG, "--iters", "2", "--warmup", "1", "--device", "cpu", "--json", str(json_path),
                             "--cfg-options", f"model.pretrained={tiny_flux_dir}", "train_cfg.batch_size=2"])
    rows = table_rows(capsys.readouterr().out)

    assert list(rows) == [*breakdown.COMPONENTS, "total"]
    components = {name: ms for name, (ms, _) in rows.items() if name != "total"}
    assert all(ms >= 0 for ms in components.values())
    for name in (breakdown.TEACHER, breakdown.STUDENT_FORWARD, breakdown.DROPOUT, breakdown.STUDENT_BACKWARD,
                 breakdown.ROLLOUT):
        assert components[name] > 0, name
    assert sum(components.values()) == pytest.approx(rows["total"][0], abs=0.5)
    assert sum(share for name, (_, share) in rows.items() if name != "total") == pytest.approx(100, abs=0.5)
    assert result["iters_per_sec"] == pytest.approx(1 / result["sec_per_iter"])
    assert len(result["step_seconds"]) == 2
    assert json.loads(json_path.read_text())["seconds"] == pytest.approx(result["seconds"])
    assert torch.Tensor.backward is backward  # the timing patches are gone


def test_param_count_full_size_flux(param_count, capsys):
    figures = param_count.main([])
    rows = table_rows(capsys.readouterr().out)

    total, frozen, trainable = rows["total"][0], rows["frozen base (teacher)"][0], rows["trainable"][0]
    assert frozen == 11_901_408_320  # FLUX.1-dev's transformer
    assert total == frozen + trainable > 0
    assert 0 < rows["trainable"][1] < 100
    groups = {name: n for name, (n, _) in rows.items() if name.startswith("- ")}
    assert sum(groups.values()) == trainable and all(n > 0 for n in groups.values())
    # rank x (in + out) of every adapted linear: 38 single blocks (proj_mlp, proj_out), 19 double blocks
    # (ff and ff_context: net.0.proj and net.2), the timestep embedder's two linears.
    lora = 256 * (38 * (3072 + 12288 + 15360 + 3072) + 19 * 2 * 2 * (3072 + 12288) + (256 + 3072) + 2 * 3072)
    assert groups["- LoRA adapters"] == lora
    memory = figures["bytes"]
    assert memory["frozen weights"] == 2 * frozen  # bf16
    assert memory["trainable weights"] == memory["EMA shadow"] == 4 * trainable  # fp32
    assert memory["AdamW moments"] == 8 * trainable


def test_param_count_full_size_qwen_image(param_count, capsys):
    figures = param_count.main(["--config", str(REPO / "configs/qwen/arcqwen_2nfe_k16.py")])
    rows = table_rows(capsys.readouterr().out)
    assert rows["frozen base (teacher)"][0] == 20_430_401_088  # Qwen-Image's transformer (20.4B)
    # rank x (in + out): img_mlp in all 60 blocks and txt_mlp in blocks 0..58 (net.0.proj 3072->12288, net.2
    # 12288->3072), the timestep embedder's linear_1 (256->3072) and linear_2.
    lora = 256 * ((60 + 59) * 2 * (3072 + 12288) + (256 + 3072) + 2 * 3072)
    assert figures["trainable_groups"]["LoRA adapters"] == lora
    assert 4.4 < figures["trainable_pct_of_total"] < 4.6  # SPEC §8: about 4.5 %


def test_iteration_breakdown_on_the_tiny_qwen_recipe(breakdown, tiny_qwen_dir, monkeypatch, capsys):
    """The teacher's true-CFG calls (4 states x 2 steps, 2B rows each) outweigh the student's 2 forwards of B rows."""
    monkeypatch.chdir(REPO)
    result = breakdown.main(["configs/demo/arcqwen_tiny_2nfe.py", "--iters", "1", "--warmup", "1", "--device",
                             "cpu", "--cfg-options", f"model.pretrained={tiny_qwen_dir}", "train_cfg.batch_size=2"])
    capsys.readouterr()
    seconds = result["seconds"]
    assert seconds[breakdown.TEACHER] > seconds[breakdown.STUDENT_FORWARD] > 0


def test_param_count_flags(param_count, capsys):
    figures = param_count.main(["--num-modes", "4", "--lora-rank", "8"])
    capsys.readouterr()
    assert figures["trainable_groups"]["heads: rates"] == (4 - 1) * 4 * (3072 + 1)
    assert 0 < figures["trainable_pct_of_total"] < 1


def test_meta_student_has_the_real_students_parameters(param_count):
    """The meta-device shortcuts must not change what the trainer's construction makes."""
    architecture = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
                        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                        axes_dims_rope=(4, 6, 6))
    model = ModelConfig(num_modes=4, lora_rank=4, lora_alpha=4.0, dtype="bfloat16")

    def signature(backbone: FluxBackbone) -> dict[str, tuple]:
        return {name: (tuple(p.shape), p.dtype, p.requires_grad) for name, p in backbone.named_parameters()}

    real = FluxBackbone(FluxTransformer2DModel(**architecture).to(torch.bfloat16), num_modes=4, lora_rank=4,
                        lora_alpha=4.0, lora_dropout=model.lora_dropout, compute_dtype=torch.bfloat16)
    assert signature(param_count.build_student(model, architecture)) == signature(real)


def test_gpu_train_check_builds_full_size_on_meta_and_counts_flops():
    """The GPU script cannot run here; its model construction and FLOP count can."""
    from arcflow.config import load_config

    script = load_script("gpu_train_check")
    cfg = load_config(REPO / "configs/flux/arcflux_2nfe_k16.py")
    backbone = script.build_random_backbone(cfg, torch.device("meta"))
    assert sum(p.numel() for _, p in backbone.trainable_named_parameters()) == 652_405_884
    assert all(p.dtype == torch.bfloat16 for p in backbone.parameters() if not p.requires_grad)
    # ~1.25e14 FLOPs per full-size forward at 1024^2; 16 forward-equivalents per prompt per iteration
    assert 1.8e15 < script.flops_per_iteration(cfg, batch=1) < 2.2e15


def test_gpu_train_check_qwen_image_scenarios_on_meta():
    """The Qwen-Image scenarios: the full-size student on meta, true-CFG teacher rows in the FLOP count, and
    random conditioning of the real encoder's layout (masked rows, a short empty negative prompt)."""
    from arcflow.config import load_config
    from arcflow.models import get_family

    script = load_script("gpu_train_check")
    cfg = load_config(REPO / "configs/qwen/arcqwen_2nfe_k16.py")
    backbone = script.build_random_backbone(cfg, torch.device("meta"))
    assert type(backbone).__name__ == "QwenImageBackbone"
    assert sum(p.numel() for _, p in backbone.trainable_named_parameters()) == 960_687_228  # param_count's figure
    # ~7.8e13 FLOPs per forward (image stream 4096 tokens, text 512); 4 teacher calls of 2B rows + 4 student
    # forward-equivalents per student step, 2 steps.
    assert 1.7e15 < script.flops_per_iteration(cfg, batch=1) < 2.0e15
    encoder = script.RandomTextEncoder(get_family("qwen_image"), torch.float32)
    cond, negative = encoder.encode(["a", "b"]), encoder.encode([""])
    assert cond["prompt_embeds"].shape == (2, 512, 3584) and cond["prompt_embeds_mask"].shape == (2, 512)
    assert negative["prompt_embeds"].shape == (1, script.NEGATIVE_TOKENS, 3584)


def test_inference_speed_times_teacher_and_fused_and_unfused_student(capsys):
    script = load_script("inference_speed")
    figures = script.main(["--size", "32", "--teacher-steps", "3", "--repeats", "1", "--lora-rank", "4",
                           "--num-modes", "2", "--unfused"])
    rows = figures["rows"]
    assert list(rows) == ["teacher, 3-step FluxPipeline", "ArcFlow student, 2 NFE, LoRA unfused",
                          "ArcFlow student, 2 NFE"]
    assert [row["transformer_calls"] for row in rows.values()] == [3, 2, 2]
    assert all(row["cpu_seconds"] > 0 and row["seconds"] > 0 for row in rows.values())
    assert figures["speedup_cpu_time"] > 0
    assert "CPU time" in capsys.readouterr().out


def test_lora_dropout_cost_counts_flux_masked_elements(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    script = load_script("lora_dropout_cost")
    result = script.main(["--tokens", "16", "--features", "32", "--repeats", "1", "--no-fused", "--device", "cpu",
                          "--layer-tokens", "4", "--rank", "4"])
    tokens = 64 * 64 + 512
    # by hand: double blocks' ff (3072 and 12288 wide inputs) on image and text tokens, single blocks' proj_mlp
    # (3072) and proj_out (3072 + 12288), the timestep embedder's two linears (256, 3072) on one row
    expected = 19 * tokens * (3072 + 12288) + 38 * tokens * (3072 + 3072 + 12288) + 256 + 3072
    estimate = result["full_size"]
    assert estimate["masked_elements_per_forward"] == expected
    assert set(result["measured_ns_per_element"]) == {"eager hash masks", "nn.functional.dropout",
                                                      "one elementwise pass (x * 2)"}
    assert len(result["layer_ms"]) == 4 and all(ms > 0 for ms in result["layer_ms"].values())
    # 2 student steps x (2 forwards with the checkpointing recompute + 1 backward) x 4 bytes (bf16 read + write)
    arcflow = estimate["rows"][-1]
    assert arcflow["bytes_per_element"] == 2 * (2 * 4 + 4)
    assert arcflow["pass_sec"] == pytest.approx(expected * 24 / 3.35e12)
    for mfu, sec in estimate["sec_per_iter"].items():
        assert arcflow["share_pct"][mfu] == pytest.approx(100 * arcflow["pass_sec"] / sec)
    assert "| LoRA input passes |" in capsys.readouterr().out
