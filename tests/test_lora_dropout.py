"""Counter-based LoRA dropout: the direct definition, its statistics, and independence of the batch split."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxTransformer2DModel
from torch import nn

from arcflow.config import load_config
from arcflow.models import build_backbone, lora_dropout
from arcflow.models.base import ADAPTER_NAME
from arcflow.models.flux.backbone import FluxBackbone
from arcflow.models.lora_dropout import (DropoutKeys, HashDropout, _row_keys, chain_int, drop, drop_fused, hash32,
                                         hash32_int, int32_pattern, keep_mask, keep_threshold)

DEMO = "configs/demo/arcflux_tiny_2nfe.py"


def keys(samples: list[int], seed: int = 42, iteration: int = 3, call: int = 1) -> DropoutKeys:
    k = DropoutKeys(seed)
    k.set(iteration, call, torch.tensor(samples))
    return k


def reference_mask(shape: tuple[int, ...], p: float, samples: list[int], seed: int, iteration: int, call: int,
                   layer: int) -> torch.Tensor:
    """The module docstring's definition, element by element in Python integers."""
    batch, features = shape[0], shape[-1]
    rows = 1
    for size in shape[1:-1]:
        rows *= size
    layer_key = chain_int(seed, iteration, call, layer)
    threshold = round(p * 2**31)
    out = torch.zeros(batch, rows, features, dtype=torch.bool)
    for b in range(batch):
        sample_key = hash32_int(hash32_int(samples[b] % 2**32) ^ layer_key)
        for t in range(rows):
            row = hash32_int(hash32_int(t) ^ sample_key)
            for f in range(features):
                out[b, t, f] = hash32_int(hash32_int(f ^ 0x9E3779B9) ^ row) % 2**31 >= threshold
    return out.view(shape)


def test_hash32_tensor_matches_the_integer_definition():
    """int32 patterns: products wrap, shifts are made logical; eager (vectorised body and scalar tail)
    and compiled must equal the unsigned definition on values that overflow every step."""
    generator = torch.Generator().manual_seed(0)
    values = [0, 1, 2, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 123456789, 2**32 - 2]
    values += torch.randint(0, 2**32, (4099,), generator=generator, dtype=torch.int64).tolist()
    expected = [int32_pattern(hash32_int(v)) for v in values]
    patterns = torch.tensor([int32_pattern(v) for v in values], dtype=torch.int32)
    for n in (len(values), 7):
        assert hash32(patterns[:n].clone()).tolist() == expected[:n]
    assert torch.compile(hash32, dynamic=True)(patterns.clone()).tolist() == expected
    assert hash32_int(0) == 0 and hash32_int(1) != 1  # a bijection fixing 0, mixing everything else


@pytest.mark.parametrize("shape", [(2, 3, 5), (3, 4), (2, 2, 3, 4)])
def test_keep_mask_matches_the_direct_definition(shape):
    samples = [7, 2**33 + 5, 11][:shape[0]]
    ours = keep_mask(torch.Size(shape), 0.3, keys(samples, seed=-9, iteration=5, call=2), 4, torch.device("cpu"))
    assert torch.equal(ours, reference_mask(shape, 0.3, samples, -9, 5, 2, 4))


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_keep_rate(p):
    n = 8 * 128 * 256
    mask = keep_mask(torch.Size((8, 128, 256)), p, keys(list(range(8))), 0, torch.device("cpu"))
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(1 - mask.float().mean().item() - p) < 5 * sigma


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(((a - a.mean()) * (b - b.mean())).mean() / (a.std() * b.std()))


def test_masks_are_uncorrelated_across_samples_rows_layers_iterations_and_calls():
    shape, p, cpu = torch.Size((2, 64, 512)), 0.5, torch.device("cpu")
    base = keep_mask(shape, p, keys([10, 11]), 0, cpu)
    others = {
        "sample": base[1],
        "row": base[0].roll(1, dims=0),
        "feature": base[0].roll(1, dims=1),
        "layer": keep_mask(shape, p, keys([10, 11]), 1, cpu)[0],
        "iteration": keep_mask(shape, p, keys([10, 11], iteration=4), 0, cpu)[0],
        "call": keep_mask(shape, p, keys([10, 11], call=0), 0, cpu)[0],
        "seed": keep_mask(shape, p, keys([10, 11], seed=43), 0, cpu)[0],
    }
    bound = 5 / base[0].numel() ** 0.5  # five standard errors of a correlation of independent bits
    for name, other in others.items():
        assert abs(_correlation(base[0], other)) < bound, name
        assert not torch.equal(base[0], other), name


def test_a_sample_gets_its_mask_whatever_batch_it_is_in():
    shape, cpu = (4, 16, 32), torch.device("cpu")
    whole = keep_mask(torch.Size(shape), 0.2, keys([20, 21, 22, 23]), 2, cpu)
    for b in range(4):
        alone = keep_mask(torch.Size((1, *shape[1:])), 0.2, keys([20 + b]), 2, cpu)
        assert torch.equal(whole[b:b + 1], alone)


def test_hash_dropout_scales_kept_inputs_and_is_the_identity_in_eval():
    k = keys([0, 1])
    dropout = HashDropout(0.25, 0, k)
    x = torch.randn(2, 8, 16, requires_grad=True)
    y = dropout(x)
    mask = keep_mask(x.shape, 0.25, k, 0, x.device)
    torch.testing.assert_close(y, torch.where(mask, x / 0.75, 0.0))
    y.sum().backward()
    torch.testing.assert_close(x.grad, mask.float() / 0.75)
    assert dropout.eval()(x) is x
    with pytest.raises(RuntimeError, match="global sample indices"):
        HashDropout(0.25, 0, DropoutKeys()).train()(x)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        HashDropout(1.0, 0, k)


def test_every_lora_layer_of_the_backbone_gets_hash_dropout(tiny_flux_dir):
    cfg = load_config(DEMO, {"model.pretrained": str(tiny_flux_dir)})
    backbone = build_backbone(cfg.model, torch.device("cpu"))
    slots = [m.lora_dropout[ADAPTER_NAME] for m in backbone.modules()
             if isinstance(getattr(m, "lora_dropout", None), nn.ModuleDict)]
    assert slots and all(isinstance(s, HashDropout) and s.p == cfg.model.lora_dropout for s in slots)
    assert sorted(s.layer for s in slots) == list(range(len(slots)))
    assert all(s.keys is backbone.dropout_keys for s in slots)


def test_the_fused_kernel_equals_the_eager_definition():
    """CUDA runs :func:`drop_fused` (one compiled kernel); here it is compiled for the CPU, on two shapes
    (one compilation: the shapes are dynamic), and must equal the eager function bit for bit."""
    for shape in ((2, 12, 40), (3, 7, 24)):
        k = keys(list(range(5, 5 + shape[0])))
        row, g = _row_keys(torch.Size(shape), k, 3, torch.device("cpu"))
        x = torch.randn(shape, requires_grad=True)
        eager = drop(x, row, g, keep_threshold(0.3), 1 / 0.7)
        fused = drop_fused()(x, row, g, keep_threshold(0.3), 1 / 0.7)
        assert torch.equal(fused, eager)
        assert torch.equal(eager != 0, keep_mask(torch.Size(shape), 0.3, k, 3, torch.device("cpu")))
        (grad_fused,) = torch.autograd.grad(fused.sum(), x)
        (grad_eager,) = torch.autograd.grad(eager.sum(), x)
        assert torch.equal(grad_fused, grad_eager)


@pytest.mark.parametrize("fused", [False, True])
def test_backward_masks_the_gradient_and_fused_saves_nothing_of_the_input_size(fused, monkeypatch):
    """Fused (CUDA; compiled for the CPU here) nothing of the input's size is kept from forward to
    backward, only the (B, T) and (F,) keys: backward makes the mask again. Eager keeps the mask."""
    monkeypatch.setattr(lora_dropout, "fused_on", lambda _: fused)
    k = keys([3, 4])
    x = torch.randn(2, 32, 64, requires_grad=True)
    saved: list[torch.Size] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        y = HashDropout(0.25, 1, k)(x)
    assert saved and all(shape.numel() < x[0].numel() for shape in saved) == fused, saved
    grad_out = torch.randn_like(y)
    (grad,) = torch.autograd.grad(y, x, grad_out)
    torch.testing.assert_close(grad, torch.where(keep_mask(x.shape, 0.25, k, 1, x.device), grad_out / 0.75, 0.0))


def _student_step(backbone: nn.Module, cast: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor], set[torch.dtype]]:
    """Output, LoRA gradients and the dtypes the dropout modules saw, of one bf16 student forward-backward."""
    for layer in backbone._lora_layers:
        layer.cast_input_dtype_enabled = cast
    seen: set[torch.dtype] = set()
    hooks = [m.register_forward_pre_hook(lambda _, args: seen.add(args[0].dtype))
             for m in backbone.modules() if isinstance(m, HashDropout)]
    backbone.zero_grad()
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    cond = {"prompt_embeds": torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(2)),
            "pooled_prompt_embeds": torch.randn(2, 32, generator=torch.Generator().manual_seed(3))}
    policy = backbone.student_policy(x, torch.tensor([1.0, 0.6]), cond)
    out = torch.cat([policy.means.flatten(), policy.logits.flatten()])
    out.square().sum().backward()
    for hook in hooks:
        hook.remove()
    grads = {n: p.grad.clone() for n, p in backbone.named_parameters() if "lora_" in n and p.grad is not None}
    return out.detach(), grads, seen


def test_bf16_lora_inputs_skip_peft_fp32_round_trip_without_changing_a_bit():
    """Under bf16 autocast lora_A computes in bf16 whatever it is given: peft's cast of the input to the
    fp32 adapter weights (then dropout on fp32) only adds traffic. Skipping it changes no output bit."""
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    backbone = FluxBackbone(transformer.to(torch.bfloat16), num_modes=4, lora_rank=4, lora_alpha=4,
                            lora_dropout=0.25, compute_dtype=torch.bfloat16)
    for name, p in backbone.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(len(name)))
    assert all(not layer.cast_input_dtype_enabled for layer in backbone._lora_layers)
    backbone.dropout_keys.set(iteration=2, call=1, samples=torch.tensor([5, 9]))
    out_skip, grads_skip, seen_skip = _student_step(backbone, cast=False)
    out_cast, grads_cast, seen_cast = _student_step(backbone, cast=True)
    assert seen_skip == {torch.bfloat16} and torch.float32 in seen_cast
    assert torch.equal(out_skip, out_cast)
    assert grads_skip.keys() == grads_cast.keys() and len(grads_skip) > 0
    for name in grads_skip:
        assert torch.equal(grads_skip[name], grads_cast[name]), name


def test_a_failing_compiler_falls_back_to_the_same_masks_with_one_warning(monkeypatch):
    import torch._dynamo
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config.cpp, "cxx", (None, "/bin/false"))
    monkeypatch.setattr(inductor_config, "fx_graph_cache", False)
    torch._dynamo.reset()
    drop_fused.cache_clear()
    try:
        k = keys([1, 2])
        x = torch.randn(2, 5, 24)
        row, g = _row_keys(x.shape, k, 0, x.device)
        with pytest.warns(UserWarning, match="could not be compiled .*C\\+\\+ compiler.*eager masks") as caught:
            first = drop_fused()(x, row, g, keep_threshold(0.3), 1 / 0.7)
            second = drop_fused()(x, row, g, keep_threshold(0.3), 1 / 0.7)
        assert sum("LoRA dropout" in str(w.message) for w in caught) == 1
        assert torch.equal(first, drop(x, row, g, keep_threshold(0.3), 1 / 0.7)) and torch.equal(first, second)
    finally:
        torch._dynamo.reset()
        drop_fused.cache_clear()
