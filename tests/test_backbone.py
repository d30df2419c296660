"""The FLUX backbone: LoRA placement, one shared copy of the teacher, SPEC §2 initialisation."""

import math

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel

from arcflow.models.base import pack, unpack
from arcflow.models.flux.backbone import FluxBackbone

K = 4


def tiny_transformer(seed: int = 0) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                   pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return model


def student_backbone(num_modes: int = K) -> FluxBackbone:
    """In training mode, as the trainer runs it: LoRA dropout masks for the two samples of :func:`inputs`."""
    backbone = FluxBackbone(tiny_transformer(), num_modes=num_modes, lora_rank=4, lora_alpha=4,
                            compute_dtype=torch.float32)
    backbone.dropout_keys.set(iteration=0, call=0, samples=torch.arange(2))
    return backbone


@pytest.fixture
def backbone() -> FluxBackbone:
    return student_backbone()


def inputs(batch: int = 2, h: int = 8, w: int = 12):
    g = torch.Generator().manual_seed(3)
    cond = {"prompt_embeds": torch.randn(batch, 7, 32, generator=g),
            "pooled_prompt_embeds": torch.randn(batch, 32, generator=g)}
    return torch.randn(batch, 16, h, w, generator=g), torch.tensor([1.0, 0.6])[:batch], cond


def test_pack_matches_diffusers_and_unpack_inverts_it():
    x = torch.randn(2, 16, 8, 12)
    torch.testing.assert_close(pack(x), FluxPipeline._pack_latents(x, 2, 16, 8, 12), rtol=0, atol=0)
    torch.testing.assert_close(unpack(pack(x), 8, 12)[:, 0], x, rtol=0, atol=0)


def test_lora_targets_are_exactly_the_spec_modules(backbone):
    adapted = {name.split(".lora_")[0] for name, _ in backbone.named_parameters() if ".lora_" in name}
    expected = {f"transformer.single_transformer_blocks.{i}.{m}" for i in range(2) for m in ("proj_mlp", "proj_out")}
    expected |= {f"transformer.transformer_blocks.{i}.{ff}.net.{m}" for i in range(2)
                 for ff in ("ff", "ff_context") for m in ("0.proj", "2")}
    expected |= {f"transformer.time_text_embed.timestep_embedder.linear_{i}" for i in (1, 2)}
    assert adapted == expected


def test_only_adapters_heads_and_norm_out_train(backbone):
    names = [n for n, _ in backbone.trainable_named_parameters()]
    assert all(".lora_" in n or ".student." in n for n in names)
    assert any("norm_out.student" in n for n in names) and any("proj_out.student.rates" in n for n in names)
    assert all(p.dtype == torch.float32 for _, p in backbone.trainable_named_parameters())


def test_teacher_and_student_share_one_copy_of_the_frozen_weights():
    transformer = tiny_transformer()
    base = {name: p.data_ptr() for name, p in transformer.named_parameters()}
    n_base = sum(p.numel() for p in transformer.parameters())
    backbone = FluxBackbone(transformer, num_modes=K, lora_rank=4, lora_alpha=4, compute_dtype=torch.float32)
    n_trainable = sum(p.numel() for _, p in backbone.trainable_named_parameters())
    assert sum(p.numel() for p in backbone.parameters()) == n_base + n_trainable
    frozen = {n: p for n, p in backbone.named_parameters() if not p.requires_grad}
    ptrs = {p.data_ptr() for p in frozen.values()}
    assert ptrs == set(base.values())  # the very same storages, no copy


def test_student_equals_teacher_up_to_mean_mode_noise_at_init(backbone):
    x, sigma, cond = inputs()
    u = backbone.teacher_velocity(x, sigma, cond)
    policy = backbone.student_policy(x, sigma, cond)
    teacher_bias = backbone.transformer.proj_out.teacher.bias.reshape(16, 4)
    noise = backbone.heads.means.bias.reshape(K, 16, 4) - teacher_bias
    assert torch.allclose(noise, noise[..., :1].expand_as(noise))  # one value per mode and channel
    assert 0.01 < noise.std().item() < 0.15
    expected = u + noise[..., 0].mean(0)[None, :, None, None]
    torch.testing.assert_close(policy.velocity(sigma), expected, rtol=1e-5, atol=1e-5)


def test_head_initialisation(backbone):
    heads = backbone.heads
    assert torch.count_nonzero(heads.logits.weight) == 0 and torch.count_nonzero(heads.logits.bias) == 0
    assert torch.count_nonzero(heads.rates.weight) == 0
    rates = heads.rates.bias.reshape(K - 1, 4)
    expected = torch.exp(torch.linspace(math.log(0.2), math.log(4.0), K - 1))
    torch.testing.assert_close(rates, torch.log(expected)[:, None].expand(K - 1, 4))
    x, sigma, cond = inputs()
    policy = backbone.student_policy(x, sigma, cond)
    assert policy.means.shape == (2, K, 16, 8, 12)
    assert policy.logits.shape == (2, K, 1, 8, 12) and policy.rates.shape == (2, K - 1, 1, 8, 12)


def test_teacher_ignores_adapters_and_student_heads(backbone):
    x, sigma, cond = inputs()
    before = backbone.teacher_velocity(x, sigma, cond)
    with torch.no_grad():
        for _, p in backbone.trainable_named_parameters():
            p.add_(torch.randn_like(p) * 0.5)
    torch.testing.assert_close(backbone.teacher_velocity(x, sigma, cond), before, rtol=0, atol=0)
    changed = backbone.student_policy(x, sigma, cond).velocity(sigma)
    assert (changed - before).abs().max() > 1e-2


def test_gradients_reach_every_trainable_parameter(backbone):
    x, sigma, cond = inputs()
    with torch.no_grad():
        for name, p in backbone.trainable_named_parameters():
            if "lora_B" in name or "logits" in name or "rates.weight" in name:
                p.normal_(std=0.01)  # zero-initialised pieces would block gradient to their partners
    policy = backbone.student_policy(x, sigma, cond)
    policy.average_velocity(sigma, sigma * 0.5).square().mean().backward()
    for name, p in backbone.trainable_named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in backbone.parameters() if not p.requires_grad)


def test_single_mode_student_is_a_straight_shortcut():
    """K = 1: no rates head outputs; the policy is one constant velocity (the linear ablation)."""
    backbone = student_backbone(num_modes=1)
    x, sigma, cond = inputs()
    policy = backbone.student_policy(x, sigma, cond)
    assert policy.rates.shape == (2, 0, 1, 8, 12)
    torch.testing.assert_close(policy.velocity(sigma * 0.3), policy.means[:, 0])
