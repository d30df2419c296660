"""The embedding cache: fp8 round trip, streamed safetensors, cache == on the fly, damage, restart."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from arcflow.config import load_config
from arcflow.data.batches import build_train_data, build_val_data
from arcflow.data.cache_codec import dequantize, quantize
from arcflow.data.cache_files import content_hash, read_header, write_safetensors
from arcflow.data.embedding_cache import CachedSplit, CacheError, shard_path, verify_cache

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs/demo/arcflux_tiny_2nfe.py"
SIZES = [(128, 128), (96, 160), (160, 96), (64, 256)]


def run_tool(argv: list[str]) -> None:
    """tools/ holds scripts, not a package: import the cache tool by path and run its main in-process."""
    spec = importlib.util.spec_from_file_location("cache_tool", REPO / "tools/cache_image_prompt_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(argv)


def write_prompts(path: Path, count: int) -> Path:
    words = ["red", "blue", "cube", "sphere", "on", "a", "table", "under", "two", "large"]
    lines = [json.dumps({"prompt": f"{i} " + " ".join(words[(i * k) % len(words)] for k in range(1, 3 + i % 6)),
                         "height": SIZES[i % 4][0], "width": SIZES[i % 4][1]}) for i in range(count)]
    path.write_text("\n".join(lines) + "\n")
    return path


def options(tiny: Path, prompts: Path, root: Path, **extra) -> dict:
    return {"model.pretrained": str(tiny), "data.source": str(prompts), "data.data_root": str(root),
            "data.shard_size": 8, "data.train.end_ind": -4, "data.val.start_ind": -4, "data.val.repeat": 2, "data.cache_storage": "fp8", **extra}


def tool_argv(opts: dict, *extra: str) -> list[str]:
    return [str(DEMO), "--text-encoder", str(REPO / "configs/demo/_text_encoder.py"), "--batch-size", "4", *extra,
            "--cfg-options", *[f"{k}={v}" for k, v in opts.items()]]


@pytest.fixture(scope="module")
def built(tiny_flux_dir, tmp_path_factory) -> dict:
    """30 prompts of 4 sizes cached with the tiny encoders: 26 train (4 shards of 8) + 4 val."""
    tmp = tmp_path_factory.mktemp("cache")
    opts = options(tiny_flux_dir, write_prompts(tmp / "prompts.jsonl", 30), tmp / "root")
    run_tool(tool_argv(opts))
    return opts


def fp8_close(cached: torch.Tensor, reference: torch.Tensor) -> bool:
    """Within e4m3's rounding: half a unit in the last place (2^-4 relative), or subnormal steps."""
    scale = quantize(reference)[1][:, None, None]
    return bool(((cached - reference).abs() <= reference.abs() / 16 + scale * 2.0**-10 + 1e-6).all())


def test_quantize_uses_power_of_two_scales_and_fp8_rounding_only():
    x = torch.randn(3, 16, 8) * torch.tensor([1e-3, 1.0, 300.0])[:, None, None]
    x[1, 0, 0] = 0.0
    codes, scale = quantize(x)
    assert codes.dtype == torch.uint8 and torch.equal(torch.exp2(torch.log2(scale).round()), scale)
    assert fp8_close(dequantize(codes, scale, torch.float32), x)
    # Exact in any dtype: bf16 dequantisation equals the fp32 result rounded once to bf16.
    assert torch.equal(dequantize(codes, scale, torch.bfloat16), dequantize(codes, scale, torch.float32).bfloat16())
    assert quantize(torch.zeros(1, 2, 2))[1].item() == 1.0
    with pytest.raises(ValueError, match=r"non-finite values for batch rows \[1\]"):
        quantize(torch.stack([x[0], x[1].clone().fill_(float("nan"))]))


def test_streamed_safetensors_loads_with_safetensors_and_hashes_header_and_data(tmp_path):
    path = tmp_path / "s.safetensors"
    parts = [b"abc", b"defgh"]
    sha, size = write_safetensors(path, {"blob": (np.uint8, [8], parts),
                                         "x": (np.float32, [2, 2], [np.arange(4, dtype=np.float32)])}, {"k": "v"})
    with safe_open(str(path), "pt") as f:
        assert f.get_tensor("blob").tolist() == list(b"abcdefgh")
        assert f.get_tensor("x").tolist() == [[0, 1], [2, 3]]
        assert f.metadata() == {"k": "v", "sha256": sha}
    assert content_hash(path) == sha and path.stat().st_size == size


def test_cache_equals_on_the_fly_up_to_fp8_rounding(built):
    cached_cfg = load_config(DEMO, built)
    fly_cfg = load_config(DEMO, {**built, "data.cache": "never"})
    cached, fly = (build_train_data(c, "cpu", 0, 1, seed=3) for c in (cached_cfg, fly_cfg))
    assert cached.source == "cache" and cached.text_encoder is None and fly.source == "encoder"
    for _ in range(4):
        (p_cache, c_cache), (p_fly, c_fly) = cached.next_batch(), fly.next_batch()
        assert p_cache == p_fly and len({(p.height, p.width) for p in p_cache}) == 1
        assert c_cache["prompt_embeds"].dtype == torch.float32 and c_cache["prompt_embeds"].shape == (4, 32, 32)
        assert fp8_close(c_cache["prompt_embeds"], c_fly["prompt_embeds"])
        assert torch.allclose(c_cache["pooled_prompt_embeds"], c_fly["pooled_prompt_embeds"], atol=1e-6)
    val, val_fly = build_val_data(cached_cfg, "cpu"), build_val_data(fly_cfg, "cpu", fly)
    assert val.prompts == val_fly.prompts and len(val.prompts) == 8  # the last 4 prompts, twice
    texts = [p.text for p in val.prompts[:3]]
    assert fp8_close(val.encode(texts)["prompt_embeds"], val_fly.encode(texts)["prompt_embeds"])
    with pytest.raises(KeyError, match="not in the validation cache"):
        val.encode(["a prompt that was never cached"])


def test_damaged_or_truncated_shard_is_an_error_naming_it(built, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(built["data.data_root"], root)
    train = root / "train"
    damaged, truncated = shard_path(train, 1), shard_path(train, 2)
    header, data_start = read_header(damaged)
    raw = bytearray(damaged.read_bytes())
    raw[data_start + header["prompt_embeds.blob"]["data_offsets"][0] + 100] ^= 0xFF  # one bit pattern in a T5 row
    damaged.write_bytes(bytes(raw))
    truncated.write_bytes(truncated.read_bytes()[:-10])
    cache = CachedSplit(train)
    rows = np.flatnonzero(cache._shard == 1)
    with pytest.raises(CacheError, match="shard_000001.safetensors: row .* damaged"):
        cache.load(rows, "cpu", torch.float32)
    with pytest.raises(CacheError, match="shard_000002.safetensors.*truncated"):
        cache.load(np.flatnonzero(cache._shard == 2)[:1], "cpu", torch.float32)
    problems = verify_cache(str(root), say=lambda message: None)
    assert len(problems) == 2 and "shard_000001" in problems[0] and "shard_000002" in problems[1]


def test_restart_keeps_complete_shards_and_refuses_other_settings(built, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(built["data.data_root"], root)
    train = root / "train"
    manifest = json.loads((train / "manifest.json").read_text())
    (train / "manifest.json").unlink()
    shard_path(train, 2).unlink()
    stale = train / "shards" / "shard_000003.safetensors.tmp-123"
    stale.write_bytes(b"half a shard from a killed run")
    kept = {i: shard_path(train, i).stat().st_mtime_ns for i in (0, 1, 3)}
    opts = {**built, "data.data_root": str(root)}
    run_tool(tool_argv(opts))
    assert {i: shard_path(train, i).stat().st_mtime_ns for i in (0, 1, 3)} == kept and not stale.exists()
    assert json.loads((train / "manifest.json").read_text())["shards"] == manifest["shards"]
    with pytest.raises(SystemExit, match="plan.json was written for other settings.*num_prompts: 26 vs 5"):
        (train / "manifest.json").unlink()
        run_tool(tool_argv(opts, "--max-size", "5"))


def test_loader_benchmark_runs_and_reports_self_consistent_figures():
    spec = importlib.util.spec_from_file_location("cache_loader", REPO / "benchmarks/cache_loader.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    figures = module.main(["--prompts", "6", "--seq-len", "16", "--seq-dim", "8", "--pooled-dim", "4",
                           "--shard-size", "4", "--batch-size", "2", "--reads", "2"])
    assert figures["raw_fp8_bytes_per_prompt"] == 128 and figures["read_samples_per_s"] > 0
    assert figures["gaussian_bytes_per_prompt_on_disk"] > 4 * 4  # at least the pooled floats
