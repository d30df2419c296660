"""ArcQwenImagePipeline on the tiny Qwen-Image: the trainer's sampler in n calls of B rows (no CFG pass), the
exported LoRA in plain QwenImagePipeline, a clean unload back to the teacher, and the commands picking the family."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import QwenImagePipeline
from peft.tuners.tuners_utils import BaseTunerLayer
from PIL import Image
from safetensors.torch import load_file

from arcflow.cli import main
from arcflow.config import load_config
from arcflow.images import GRID_INFO_KEY
from arcflow.inference.student import load_ema_student
from arcflow.method.sampling import sample_student
from arcflow.models.adapter import CONFIG_FILE, LORA_FILE, AdapterConfig
from arcflow.models.base import pack, unpack
from arcflow.pipelines import ArcQwenImagePipeline

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs/demo/arcqwen_tiny_2nfe.py")
PROMPTS = ["a red circle", "two blue squares at the top"]


@pytest.fixture(scope="module")
def setup(tiny_qwen_dir, tmp_path_factory):
    """One real training iteration (large lr, no warm-up: the LoRA and heads move) and its export."""
    root = tmp_path_factory.mktemp("qwen_pipeline")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)  # the demo config names its prompt set relative to the repository
        main(["train", DEMO, "--work-dir", str(root / "run"), "--cfg-options", f"model.pretrained={tiny_qwen_dir}",
              "train_cfg.batch_size=2", "total_iters=1", "save_interval=1", "eval_interval=0",
              "optimizer.lr=0.05", "optimizer.warmup_iters=0"])
    main(["export", DEMO, "--ckpt", str(root / "run"), "--out-dir", str(root / "adapter"), "--dtype", "float32",
          "--cfg-options", f"model.pretrained={tiny_qwen_dir}"])
    return load_config(DEMO, {"model.pretrained": str(tiny_qwen_dir)}), root / "run", root / "adapter"


def arcqwen(tiny: Path, adapter: Path | None = None, fuse: bool | None = None) -> ArcQwenImagePipeline:
    pipe = ArcQwenImagePipeline.from_pretrained(tiny, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    if adapter is not None:
        pipe.load_arcflow_adapter(adapter, fuse=fuse)
    return pipe


def latents_of(pipe, cond, noise, **kwargs) -> torch.Tensor:
    h, w = noise.shape[-2:]
    packed = pipe(prompt_embeds=cond["prompt_embeds"], prompt_embeds_mask=cond["prompt_embeds_mask"],
                  latents=pack(noise), height=8 * h, width=8 * w, output_type="latent", **kwargs).images
    return unpack(packed, h, w)[:, 0]


def test_matches_the_trainers_sampler_in_n_calls_of_b_rows(setup, tiny_qwen_dir):
    cfg, run, adapter = setup
    assert AdapterConfig.load(adapter / CONFIG_FILE).family == "qwen_image"
    backbone, text_encoder, _ = load_ema_student(cfg, run, torch.device("cpu"))
    cond = text_encoder.encode(PROMPTS)
    noise = torch.randn(2, 16, 6, 8, generator=torch.Generator().manual_seed(0))
    pipe = arcqwen(tiny_qwen_dir, adapter)
    rows = []
    pipe.transformer.register_forward_hook(lambda _m, _a, kw, _o: rows.append(kw["hidden_states"].shape[0]),
                                           with_kwargs=True)
    default = latents_of(pipe, cond, noise)  # the adapter's defaults: 2 NFE, timestep_ratio 1
    assert rows == [2, 2]  # 2 evaluations of the 2 prompts, no negative-prompt pass
    torch.testing.assert_close(default, sample_student(backbone, noise, cond, 2, cfg.distill.shift, 1.0),
                               rtol=1e-5, atol=1e-5)
    ours = latents_of(pipe, cond, noise, num_inference_steps=3, timestep_ratio=0.5)
    torch.testing.assert_close(ours, sample_student(backbone, noise, cond, 3, cfg.distill.shift, 0.5),
                               rtol=1e-5, atol=1e-5)
    assert pipe.arcflow_fused and not any(isinstance(m, BaseTunerLayer) for m in pipe.transformer.modules())
    unfused = arcqwen(tiny_qwen_dir, adapter, fuse=False)
    torch.testing.assert_close(latents_of(unfused, cond, noise), default, rtol=1e-5, atol=1e-5)
    unfused.set_adapters("arcflow", 0.0)
    assert (latents_of(unfused, cond, noise) - default).abs().mean() > 1e-3  # the LoRA is live

    images = pipe("a cat", height=32, width=48, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert images.shape == (1, 3, 32, 48) and torch.isfinite(images).all()
    with pytest.raises(TypeError, match="only apply to the multi-step teacher"):
        pipe("a cat", negative_prompt="", true_cfg_scale=4.0)
    same = pipe("a cat", height=32, width=48, guidance_scale=4.0, generator=torch.Generator().manual_seed(0),
                output_type="pt").images  # the distilled guidance is accepted, and changes nothing
    assert torch.equal(same, images)
    with pytest.raises(ValueError, match="distilled its teacher's true CFG at 4.0"):
        pipe("a cat", guidance_scale=2.0)


def test_unload_gives_back_the_teacher(setup, tiny_qwen_dir):
    def teacher(pipe) -> torch.Tensor:
        return pipe("a cat", negative_prompt="", true_cfg_scale=4.0, height=32, width=32, num_inference_steps=2,
                    generator=torch.Generator().manual_seed(0), output_type="latent").images
    plain = QwenImagePipeline.from_pretrained(tiny_qwen_dir, dtype=torch.float32)
    plain.set_progress_bar_config(disable=True)
    for fuse in (True, False):
        pipe = arcqwen(tiny_qwen_dir, setup[2], fuse=fuse)
        pipe.unload_arcflow_adapter()
        torch.testing.assert_close(teacher(pipe), teacher(plain), rtol=0, atol=0)
    # guidance_scale on the teacher is the family's guidance: true CFG against the empty prompt.
    generic = pipe("a cat", guidance_scale=4.0, height=32, width=32, num_inference_steps=2,
                   generator=torch.Generator().manual_seed(0), output_type="latent").images
    torch.testing.assert_close(generic, teacher(plain), rtol=0, atol=0)


def test_plain_diffusers_loads_the_exported_lora(setup, tiny_qwen_dir):
    lora = setup[2] / LORA_FILE
    pipe = QwenImagePipeline.from_pretrained(tiny_qwen_dir, dtype=torch.float32)
    pipe.load_lora_weights(str(lora), adapter_name="arcflow")
    assert pipe.transformer.peft_config["arcflow"].r == 8
    loaded = dict(pipe.transformer.named_parameters())
    saved = load_file(lora)
    assert saved and any(".txt_mlp." in k for k in saved)
    last = len(pipe.transformer.transformer_blocks) - 1
    assert not any(f"transformer_blocks.{last}.txt_mlp" in k for k in saved)
    for key, value in saved.items():
        name = key.removeprefix("transformer.").replace(".lora_A.weight", ".lora_A.arcflow.weight")
        assert torch.equal(loaded[name.replace(".lora_B.weight", ".lora_B.arcflow.weight")], value), key


def test_generate_and_sample_pick_the_family(setup, tiny_qwen_dir, tiny_flux_dir, tmp_path):
    _, run, adapter = setup
    out = tmp_path / "grid.png"
    main(["generate", "--base", str(tiny_qwen_dir), "--adapter", str(adapter), "--prompt", "a red circle",
          "--height", "32", "--width", "48", "--out", str(out)])
    with Image.open(out) as grid:
        assert json.loads(grid.text[GRID_INFO_KEY])["nfe"] == 2
    with pytest.raises(ValueError, match="is a flux model .* but adapter .* is for the qwen_image family"):
        main(["generate", "--base", str(tiny_flux_dir), "--adapter", str(adapter), "--prompt", "x", "--out", str(out)])
    main(["sample", DEMO, "--ckpt", str(run), "--prompt", "a red circle", "--height", "32", "--width", "48",
          "--out", str(out), "--cfg-options", f"model.pretrained={tiny_qwen_dir}"])
    with Image.open(out) as image:
        assert image.size == (48, 32)
    with pytest.raises(ValueError, match="model.pretrained: .* is a flux model .* model.backbone='qwen_image'"):
        main(["sample", DEMO, "--ckpt", str(run), "--prompt", "x", "--out", str(out),
              "--cfg-options", f"model.pretrained={tiny_flux_dir}"])
