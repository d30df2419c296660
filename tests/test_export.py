"""Export of a training checkpoint to a diffusers adapter folder: layout, dtypes, clear errors."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline
from safetensors import safe_open
from safetensors.torch import load_file

from arcflow.checksums import CHECKSUM_FILE
from arcflow.cli import main
from arcflow.config import load_config
from arcflow.distributed import DistEnv
from arcflow.inference.export import EMA_GROUP, export_adapter, read_student_ema
from arcflow.models import build_backbone
from arcflow.models.adapter import CONFIG_FILE, HEADS_FILE, LORA_FILE, AdapterConfig
from arcflow.training import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs/demo/arcflux_tiny_2nfe.py")


def cfg_of(tiny: Path, **options):
    return load_config(DEMO, {"model.pretrained": str(tiny), **options})


def write_checkpoint(tiny: Path, root: Path, iteration: int = 2, seed: int = 0) -> Path:
    """A checkpoint laid out as the trainer saves it (DCP groups "model" and "ema", backbone parameter
    names), with EMA weights far from the initial ones and different from the live "model" weights."""
    backbone = build_backbone(cfg_of(tiny).model, torch.device("cpu"))
    generator = torch.Generator().manual_seed(seed)
    live = dict(backbone.trainable_named_parameters())
    ema = {name: p.detach() + 0.1 * torch.randn(p.shape, generator=generator) for name, p in live.items()}
    model = {name: p.detach().clone() for name, p in live.items()}
    return ckpt.save_checkpoint(root, iteration, {"model": model, "ema": ema}, {}, DistEnv())


@pytest.fixture(scope="module")
def run_dir(tiny_flux_dir, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("export") / "run"
    write_checkpoint(tiny_flux_dir, run / "checkpoints")
    return run


def test_tool_writes_a_folder_diffusers_loads(run_dir, tiny_flux_dir, tmp_path):
    out = tmp_path / "adapter"
    cmd = [sys.executable, "tools/export_arcflow_to_diffusers.py", DEMO, "--ckpt", str(run_dir), "--out-dir", str(out),
           "--dtype", "float32", "--cfg-options", f"model.pretrained={tiny_flux_dir}"]
    # The script's own folder comes first on sys.path, so name this checkout explicitly.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert {p.name for p in out.iterdir()} == {CONFIG_FILE, LORA_FILE, HEADS_FILE, "README.md", CHECKSUM_FILE}

    config = AdapterConfig.load(out / CONFIG_FILE)
    policy = (config.num_modes, config.shift, config.nfe, config.timestep_ratio, config.guidance)
    assert policy == (16, 3.2, 2, 1.0, 3.5)
    assert (config.lora_rank, config.lora_alpha, config.dtype, config.iteration) == (8, 8.0, "float32", 2)
    assert config.base_model == str(tiny_flux_dir) and config.total_substeps == 128

    ema, iteration = read_student_ema(cfg_of(tiny_flux_dir), run_dir)
    assert iteration == 2
    saved = {group: {k: torch.empty_like(v) for k, v in ema.items()} for group in ("model", "ema")}
    ckpt.load_checkpoint(ckpt.resolve_checkpoint(run_dir), saved)  # read independently of the exporter
    heads = load_file(out / HEADS_FILE)
    means, norm = "transformer.proj_out.student.means.weight", "transformer.norm_out.student.linear.bias"
    assert torch.equal(heads["heads.means.weight"], saved["ema"][means])  # the EMA, not the live weights
    assert not torch.equal(heads["heads.means.weight"], saved["model"][means])
    assert torch.equal(heads["norm_out.linear.bias"], saved["ema"][norm])
    with safe_open(str(out / LORA_FILE), framework="pt") as f:
        assert all(key.startswith("transformer.") and key.endswith((".lora_A.weight", ".lora_B.weight"))
                   for key in f.keys())
        header = json.loads(f.metadata()["lora_adapter_metadata"])
    assert header["transformer.r"] == 8 and header["transformer.lora_alpha"] == 8.0

    # Plain diffusers, no arcflow code: the LoRA loads with the trained rank/alpha and the EMA values.
    pipe = FluxPipeline.from_pretrained(tiny_flux_dir)
    pipe.load_lora_weights(str(out / LORA_FILE), adapter_name="arcflow")
    assert pipe.transformer.peft_config["arcflow"].r == 8
    assert pipe.transformer.peft_config["arcflow"].lora_alpha == 8.0
    loaded = dict(pipe.transformer.named_parameters())
    for key, value in saved["ema"].items():
        if ".lora_" in key:
            assert torch.equal(loaded[key.removeprefix("transformer.")], value), key


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_export_dtype_is_respected(run_dir, tiny_flux_dir, tmp_path, dtype):
    main(["export", DEMO, "--ckpt", str(run_dir), "--out-dir", str(tmp_path / "a"), "--dtype", dtype,
          "--cfg-options", f"model.pretrained={tiny_flux_dir}"])
    for name in (LORA_FILE, HEADS_FILE):
        assert {t.dtype for t in load_file(tmp_path / "a" / name).values()} == {getattr(torch, dtype)}, name
    assert AdapterConfig.load(tmp_path / "a" / CONFIG_FILE).dtype == dtype


def test_config_that_does_not_match_the_checkpoint(run_dir, tiny_flux_dir, tmp_path):
    with pytest.raises(ValueError, match="K=16 modes, model.num_modes=4"):
        export_adapter(cfg_of(tiny_flux_dir, **{"model.num_modes": 4}), run_dir, tmp_path / "a")
    with pytest.raises(ValueError, match=r"LoRA rank is \[8\], model.lora_rank=4"):
        export_adapter(cfg_of(tiny_flux_dir, **{"model.lora_rank": 4}), run_dir, tmp_path / "a")
    with pytest.raises(ValueError, match="--dtype must be one of"):
        export_adapter(cfg_of(tiny_flux_dir), run_dir, tmp_path / "a", dtype="int8")
    with pytest.raises(FileNotFoundError, match="transformer config of model.pretrained"):
        export_adapter(cfg_of(tmp_path / "no-model"), run_dir, tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_missing_or_partial_checkpoint(run_dir, tiny_flux_dir, tmp_path):
    cfg = cfg_of(tiny_flux_dir)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        export_adapter(cfg, tmp_path / "nothing-here", tmp_path / "a")

    broken = tmp_path / "broken" / "iter_0000002"
    shutil.copytree(ckpt.resolve_checkpoint(run_dir), broken)
    (broken / ".metadata").unlink()
    with pytest.raises(ckpt.CheckpointDamaged, match="missing .metadata"):
        export_adapter(cfg, broken, tmp_path / "a")

    # An EMA with a LoRA tensor missing (as if saved from a different student).
    ema, _ = read_student_ema(cfg, run_dir)
    dropped = next(key for key in sorted(ema) if ".lora_B." in key)
    partial = {key: value for key, value in ema.items() if key != dropped}
    path = ckpt.save_checkpoint(tmp_path / "partial", 7, {"ema": partial}, {}, DistEnv())
    with pytest.raises(ValueError, match=rf"missing 1 tensor\(s\) \['{dropped}'\]"):
        export_adapter(cfg, path, tmp_path / "a")

    path = ckpt.save_checkpoint(tmp_path / "no-ema", 7, {"model": ema}, {}, DistEnv())
    with pytest.raises(ValueError, match=f"no EMA weights \\('{EMA_GROUP}\\*' tensors\\); groups: \\['model'\\]"):
        export_adapter(cfg, path, tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_out_dir_is_replaced_only_when_it_is_an_adapter(run_dir, tiny_flux_dir, tmp_path):
    cfg = cfg_of(tiny_flux_dir)
    out = export_adapter(cfg, run_dir, tmp_path / "a", dtype="float32")
    export_adapter(cfg, run_dir, out, dtype="float16")  # an earlier export is replaced
    assert AdapterConfig.load(out / CONFIG_FILE).dtype == "float16"
    assert [p.name for p in tmp_path.iterdir()] == ["a"]  # no staging folder left behind

    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an ArcFlow adapter folder"):
        export_adapter(cfg, run_dir, other)
    assert (other / "keep.txt").read_text() == "mine"


def test_adapter_config_errors_name_file_and_key(tmp_path):
    path = tmp_path / CONFIG_FILE
    path.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read ArcFlow adapter config"):
        AdapterConfig.load(path)
    good = dict(base_model="b", num_modes=4, shift=3.2, nfe=2, timestep_ratio=1.0, total_substeps=128, guidance=3.5,
                lora_rank=8, lora_alpha=8.0, lora_dropout=0.0, dtype="float32", iteration=3, max_sequence_length=32,
                resolutions=[[64, 64]])
    path.write_text(json.dumps({**good, "num_modes": "4"}))
    with pytest.raises(ValueError, match="key 'num_modes' must be int, got '4'"):
        AdapterConfig.load(path)
    path.write_text(json.dumps({k: v for k, v in good.items() if k != "shift"}))
    with pytest.raises(ValueError, match=r"missing keys \['shift'\]"):
        AdapterConfig.load(path)
    path.write_text(json.dumps({**good, "nfe": 1}))
    with pytest.raises(ValueError, match="nfe=1"):
        AdapterConfig.load(path)
    path.write_text(json.dumps({**good, "format": "another-adapter"}))
    with pytest.raises(ValueError, match="format='another-adapter'"):
        AdapterConfig.load(path)
    path.write_text(json.dumps(good))
    assert AdapterConfig.load(path).num_modes == 4 and AdapterConfig.load(path).format == "arcflow-adapter"
    path.write_text(json.dumps({**good, "family": "qwen_image", "format": "arcflow-flux-adapter"}))  # arcflow <= 0.1
    assert AdapterConfig.load(path).family == "qwen_image"


def test_export_refuses_non_finite_tensors(tiny_flux_dir, tmp_path):
    """EMA values that are finite in float32 overflow float16: that export is refused, the float32 one is not."""
    cfg = cfg_of(tiny_flux_dir)
    path = write_checkpoint(tiny_flux_dir, tmp_path / "run")
    ema, _ = read_student_ema(cfg, path)
    big = next(iter(sorted(ema)))
    ema[big] = torch.full_like(ema[big], 1e6)
    ckpt.save_checkpoint(tmp_path / "big", 2, {"ema": ema}, {}, DistEnv())
    with pytest.raises(ValueError, match="tensor '.*' holds NaN or infinity in float16"):
        export_adapter(cfg, tmp_path / "big", tmp_path / "a", dtype="float16")
    assert not (tmp_path / "a").exists()
    export_adapter(cfg, tmp_path / "big", tmp_path / "a", dtype="float32")


def test_damaged_checkpoint_is_named_by_export_and_sample(run_dir, tiny_flux_dir, tmp_path):
    from arcflow.inference.student import load_ema_student

    damaged = tmp_path / "iter_0000002"
    shutil.copytree(ckpt.resolve_checkpoint(run_dir), damaged)
    shard = next(damaged.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10
    shard.write_bytes(bytes(data))
    cfg = cfg_of(tiny_flux_dir)
    with pytest.raises(ckpt.CheckpointDamaged, match=f"'{shard}' is damaged"):
        export_adapter(cfg, damaged, tmp_path / "a")
    with pytest.raises(ckpt.CheckpointDamaged, match=f"'{shard}' is damaged"):
        load_ema_student(cfg, damaged, torch.device("cpu"))
