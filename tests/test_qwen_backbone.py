"""The Qwen-Image backbone: SPEC §8 LoRA placement, the true-CFG teacher against QwenImagePipeline, step-0 student."""

from __future__ import annotations

import pathlib

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel
from test_rollout import reference_segment

from arcflow.method.policy import ArcFlowPolicy
from arcflow.method.rollout import RolloutConfig, RolloutNoise, segment_loss
from arcflow.method.sampling import sample_teacher
from arcflow.models.base import pack, unpack
from arcflow.models.qwen_image.backbone import QwenImageBackbone
from arcflow.models.qwen_image.text_encoder import PretrainedQwenImageTextEncoder

K = 4
SHIFT = 3.2


def tiny_transformer(num_layers: int = 3) -> QwenImageTransformer2DModel:
    torch.manual_seed(0)
    model = QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=num_layers,
                                        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                        axes_dims_rope=(4, 6, 6))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return model


def make_backbone(transformer: QwenImageTransformer2DModel | None = None, **kwargs) -> QwenImageBackbone:
    """LoRA dropout off: these tests are about the teacher and the heads, not the dropout masks."""
    return QwenImageBackbone(transformer or tiny_transformer(), num_modes=K, lora_rank=4, lora_alpha=4,
                             lora_dropout=0.0, compute_dtype=torch.float32, **kwargs)


def conditioning(batch: int = 2, lengths: tuple[int, ...] = (5, 7), negative_length: int = 3) -> dict:
    """Variable-length prompt rows (zero-padded, masked) and a batch-broadcast negative, as the data layer gives."""
    g = torch.Generator().manual_seed(3)
    embeds = torch.zeros(batch, max(lengths), 32)
    mask = torch.zeros(batch, max(lengths), dtype=torch.long)
    for i, n in enumerate(lengths[:batch]):
        embeds[i, :n] = torch.randn(n, 32, generator=g)
        mask[i, :n] = 1
    negative = torch.randn(1, negative_length, 32, generator=g).expand(batch, -1, -1)
    return {"prompt_embeds": embeds, "prompt_embeds_mask": mask, "negative_prompt_embeds": negative,
            "negative_prompt_embeds_mask": torch.ones(batch, negative_length, dtype=torch.long)}


def latents(batch: int = 2, h: int = 6, w: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.randn(batch, 16, h, w, generator=g), torch.tensor([1.0, 0.6])[:batch]


def direct_velocity(backbone: QwenImageBackbone, x: torch.Tensor, sigma: torch.Tensor, embeds: torch.Tensor
                    ) -> torch.Tensor:
    """One unmasked call of the plain teacher (adapters off, its own output layers) on unpadded text."""
    transformer = backbone.transformer
    b, _, h, w = x.shape
    transformer.disable_adapters()
    try:
        with torch.no_grad():
            tokens = transformer(hidden_states=pack(x), encoder_hidden_states=embeds, timestep=sigma,
                                 img_shapes=[[(1, h // 2, w // 2)]] * b, return_dict=False)[0]
    finally:
        transformer.enable_adapters()
    return unpack(tokens, h, w)[:, 0]


def direct_guided(backbone: QwenImageBackbone, x: torch.Tensor, sigma: torch.Tensor, cond: dict,
                  scale: float = 4.0) -> torch.Tensor:
    out = []
    for i in range(x.shape[0]):
        row = cond["prompt_embeds"][i, cond["prompt_embeds_mask"][i].bool()][None]
        negative = cond["negative_prompt_embeds"][i : i + 1]
        u_c = direct_velocity(backbone, x[i : i + 1], sigma[i : i + 1], row)
        u_u = direct_velocity(backbone, x[i : i + 1], sigma[i : i + 1], negative)
        out.append(u_u + scale * (u_c - u_u))
    return torch.cat(out)


def test_lora_targets_are_exactly_the_spec_modules():
    backbone = make_backbone()
    adapted = {name.split(".lora_")[0] for name, _ in backbone.named_parameters() if ".lora_" in name}
    expected = {f"transformer.transformer_blocks.{i}.img_mlp.net.{m}" for i in range(3) for m in ("0.proj", "2")}
    expected |= {f"transformer.transformer_blocks.{i}.txt_mlp.net.{m}" for i in range(2) for m in ("0.proj", "2")}
    expected |= {f"transformer.time_text_embed.timestep_embedder.linear_{i}" for i in (1, 2)}
    assert adapted == expected  # no adapter on the last block's text stream, whose output is discarded
    names = [n for n, _ in backbone.trainable_named_parameters()]
    assert all(".lora_" in n or ".student." in n for n in names)
    assert all(p.dtype == torch.float32 for _, p in backbone.trainable_named_parameters())


def test_teacher_is_one_batched_call_of_2b_rows_equal_to_the_cfg_transcription():
    backbone = make_backbone()
    x, sigma = latents()
    cond = conditioning()
    calls = []
    hook = backbone.transformer.register_forward_hook(lambda _m, _a, kw, out: calls.append(kw["hidden_states"].shape[0]),
                                                      with_kwargs=True)
    u = backbone.teacher_velocity(x, sigma, cond)
    hook.remove()
    assert calls == [4]
    torch.testing.assert_close(u, direct_guided(backbone, x, sigma, cond), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(u, direct_guided(backbone, x, sigma, cond, scale=1.0), atol=1e-2)


def test_masked_padding_changes_nothing():
    backbone = make_backbone()
    x, sigma = latents()
    cond = conditioning()
    padded = dict(cond)
    padded["prompt_embeds"] = torch.cat([cond["prompt_embeds"], torch.randn(2, 4, 32)], dim=1)  # junk, masked out
    padded["prompt_embeds_mask"] = torch.cat([cond["prompt_embeds_mask"], torch.zeros(2, 4, dtype=torch.long)], 1)
    torch.testing.assert_close(backbone.teacher_velocity(x, sigma, padded), backbone.teacher_velocity(x, sigma, cond),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(backbone.student_policy(x, sigma, padded).velocity(sigma),
                               backbone.student_policy(x, sigma, cond).velocity(sigma), rtol=1e-5, atol=1e-5)


def test_student_at_step_0_is_the_conditional_teacher_plus_mode_bias_noise():
    backbone = make_backbone()
    x, sigma = latents()
    cond = conditioning()
    policy = backbone.student_policy(x, sigma, cond)
    noise = backbone.heads.means.bias.reshape(K, 16, 4) - backbone.transformer.proj_out.teacher.bias.reshape(16, 4)
    assert torch.allclose(noise, noise[..., :1].expand_as(noise)) and 0.01 < noise.std().item() < 0.15
    conditional = torch.cat([direct_velocity(backbone, x[i : i + 1], sigma[i : i + 1],
                                             cond["prompt_embeds"][i, cond["prompt_embeds_mask"][i].bool()][None])
                             for i in range(2)])
    expected = conditional + noise[..., 0].mean(0)[None, :, None, None]
    torch.testing.assert_close(policy.velocity(sigma), expected, rtol=1e-4, atol=1e-4)


def test_missing_negative_is_a_clear_error():
    backbone = make_backbone()
    x, sigma = latents()
    cond = {k: v for k, v in conditioning().items() if not k.startswith("negative_")}
    with pytest.raises(KeyError, match="negative_prompt_embeds"):
        backbone.teacher_velocity(x, sigma, cond)
    backbone.student_policy(x, sigma, cond)  # the student never needs it


@pytest.fixture(scope="module")
def oracle(tiny_qwen_dir: pathlib.Path):
    """QwenImagePipeline on the tiny model with a fixed-shift scheduler, the backbone (renorm, as the pipeline
    does) on its own copy of the same transformer, and the encoder's conditioning of one prompt."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=SHIFT, use_dynamic_shifting=False)
    pipe = QwenImagePipeline.from_pretrained(tiny_qwen_dir, scheduler=scheduler, dtype=torch.float32)
    backbone = QwenImageBackbone.from_pretrained(str(tiny_qwen_dir), torch_dtype=torch.float32, num_modes=K,
                                                 lora_rank=4, lora_alpha=4, compute_dtype=torch.float32,
                                                 cfg_renorm=True)
    encoder = PretrainedQwenImageTextEncoder(tiny_qwen_dir, torch_dtype=torch.float32)
    cond = encoder.schema.with_negative(encoder.encode(["a red cube"]), encoder.encode([""]))
    return pipe, backbone, cond


def _pipeline_latents(pipe: QwenImagePipeline, noise: torch.Tensor, steps: int) -> torch.Tensor:
    out = pipe("a red cube", negative_prompt="", true_cfg_scale=4.0, height=48, width=64, num_inference_steps=steps,
               latents=pack(noise), output_type="latent").images
    return unpack(out, 6, 8)[:, 0]


def test_guided_velocity_equals_the_pipelines_first_step(oracle):
    pipe, backbone, cond = oracle
    noise = torch.randn(1, 16, 6, 8, generator=torch.Generator().manual_seed(0))
    u_pipe = noise - _pipeline_latents(pipe, noise, steps=1)  # one Euler step from sigma 1 to 0
    torch.testing.assert_close(backbone.teacher_velocity(noise, torch.ones(1), cond), u_pipe, rtol=1e-4, atol=1e-4)


def test_teacher_euler_sampler_equals_the_pipeline(oracle):
    pipe, backbone, cond = oracle
    noise = torch.randn(1, 16, 6, 8, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(sample_teacher(backbone, noise, cond, 4, SHIFT), _pipeline_latents(pipe, noise, 4),
                               rtol=1e-4, atol=1e-4)


def test_rollout_with_the_true_cfg_teacher_matches_the_transcription():
    backbone = make_backbone()
    x, sigma = latents(batch=1)
    cond = conditioning(batch=1, lengths=(5,))
    cfg = RolloutConfig(shift=SHIFT)
    policy = backbone.student_policy(x, sigma, cond)
    noise = RolloutNoise.draw(1, K, cfg, torch.Generator().manual_seed(7))
    loss, x_next = segment_loss(policy, lambda x_a, s: backbone.teacher_velocity(x_a, s, cond), x, sigma, 0.5,
                                0.6, cfg, noise)

    dropped = noise.dropout < cfg.dropout
    dropped &= ~dropped.all(dim=1, keepdim=True)
    p64 = ArcFlowPolicy(policy.means.detach().double(), policy.logits.detach().double(),
                        policy.rates.detach().double(), sigma.double())
    ref_loss, ref_next = reference_segment(
        p64.means, p64.logits, p64.rates, lambda x_a, s: direct_guided(backbone, x_a.float(), s.float(), cond).double(),
        x.double(), torch.ones(1, dtype=torch.float64), 0.5, 0.6, cfg, (~dropped).tolist(),
        noise.student.double().tolist(), noise.teacher.double().tolist())
    assert loss.item() == pytest.approx(ref_loss, rel=1e-4)
    torch.testing.assert_close(x_next.double(), ref_next, rtol=1e-4, atol=1e-4)


def test_guidance_one_is_the_plain_conditional_teacher_in_b_rows():
    backbone = make_backbone(guidance=1.0)
    x, sigma = latents()
    cond = conditioning()
    calls = []
    hook = backbone.transformer.register_forward_hook(lambda _m, _a, kw, out: calls.append(kw["hidden_states"].shape[0]),
                                                      with_kwargs=True)
    u = backbone.teacher_velocity(x, sigma, cond)
    hook.remove()
    assert calls == [2]
    torch.testing.assert_close(u, direct_guided(backbone, x, sigma, cond, scale=1.0), rtol=1e-4, atol=1e-4)
