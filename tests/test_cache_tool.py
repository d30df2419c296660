"""The seed's cache command under torchrun (2 CPU ranks, gloo): killed mid-way, rerun, verified, read."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from arcflow.cli import main as arcflow_main
from arcflow.config import load_config
from arcflow.data.batches import build_train_data, build_val_data
from arcflow.data.embedding_cache import shard_path

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs/demo/arcflux_tiny_2nfe.py"
TOOL = REPO / "tools/cache_image_prompt_data.py"
SIZES = [(128, 128), (96, 160), (160, 96), (112, 144), (144, 112), (64, 256)]

# Runs the tool, but rank 1 dies by SIGKILL halfway through writing its second shard; torchrun
# then terminates rank 0 wherever it is.
DYING = """
import os, runpy, signal, sys
import arcflow.data.embedding_cache as cache
real, calls = cache.write_safetensors, []
def dying(path, tensors, metadata):
    calls.append(path)
    if os.environ["RANK"] == "1" and len(calls) == 2:
        path.with_name(f"{path.name}.tmp-{os.getpid()}").write_bytes(b"half a shard")
        os.kill(os.getpid(), signal.SIGKILL)
    return real(path, tensors, metadata)
cache.write_safetensors = dying
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
               f"--master_port={free_port()}", str(script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)


def test_torchrun_cache_killed_rerun_verified_and_read(tiny_flux_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"prompt {i}: {i % 7} red cubes on a table",
                                           "height": SIZES[i % 6][0], "width": SIZES[i % 6][1]}) + "\n"
                               for i in range(200)))
    root = tmp_path / "cache"
    options = {"model.pretrained": tiny_flux_dir, "data.source": prompts, "data.data_root": root,
               "data.shard_size": 16, "data.train.end_ind": -4, "data.val.start_ind": -4, "data.val.repeat": 2}
    cfg_options = ["--cfg-options", *[f"{k}={v}" for k, v in options.items()]]
    # The seed's command, with the demo's configs.
    command = [str(DEMO), "--text-encoder", str(REPO / "configs/demo/_text_encoder.py"), "--max-size", "2304128",
               "--launcher", "pytorch", "--diff_seed", "--batch-size", "4", *cfg_options]
    dying = tmp_path / "dying.py"
    dying.write_text(DYING)

    killed = torchrun(dying, str(TOOL), *command)
    assert killed.returncode != 0 and "SIGKILL" in killed.stderr
    train = root / "train"
    done = sorted(p.name for p in (train / "shards").glob("*.safetensors"))
    assert 0 < len(done) < 13 and not (train / "manifest.json").exists()  # 196 train prompts: 13 shards of 16
    assert list((train / "shards").glob("*.tmp-*"))  # the partial file of the killed rank

    rerun = torchrun(TOOL, *command)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"{len(done)} already complete, {13 - len(done)} to write on 2 rank(s)" in rerun.stdout
    assert "storage needed: about" in rerun.stdout and "prompts/s" in rerun.stderr + rerun.stdout
    assert not list((train / "shards").glob("*.tmp-*"))
    manifest = json.loads((train / "manifest.json").read_text())
    assert manifest["num_prompts"] == 196 and len(manifest["shards"]) == 13

    arcflow_main(["cache", "verify", str(DEMO), *cfg_options])  # exits non-zero on any problem

    cfg = load_config(DEMO, {k: v if isinstance(v, int) else str(v) for k, v in options.items()})
    data = build_train_data(cfg, "cpu", rank=1, world_size=2, seed=42)
    assert data.source == "cache"
    for _ in range(3):
        batch, cond = data.next_batch()
        (height, width), = {(p.height, p.width) for p in batch}
        assert cond["prompt_embeds"].shape == (4, 32, 32) and torch.isfinite(cond["prompt_embeds"]).all()
        assert cond["pooled_prompt_embeds"].shape == (4, 32)
    assert data.state_dict()["position"] == 3  # global batches (2 ranks x 4 prompts)
    val = build_val_data(cfg, "cpu")
    assert [p.text for p in val.prompts] == [f"prompt {i}: {i % 7} red cubes on a table" for i in range(196, 200)] * 2

    shard = shard_path(train, 5)
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0x01
    shard.write_bytes(bytes(raw))
    with pytest.raises(SystemExit, match="shard_000005.safetensors: content hash"):
        arcflow_main(["cache", "verify", str(DEMO), *cfg_options])


def test_text_encoder_file_must_define_model_text_encoder(tmp_path):
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("cache_tool", TOOL)
    tool = module_from_spec(spec)
    spec.loader.exec_module(tool)
    bad = tmp_path / "_text_encoder.py"
    bad.write_text("text_encoder = dict(type='PretrainedFluxTextEncoder')\n")
    with pytest.raises(SystemExit, match="found no model.text_encoder"):
        tool.load_run_config(tool.parse_args([str(DEMO), "--text-encoder", str(bad)]))
    args = tool.parse_args([str(DEMO), "--text-encoder", str(REPO / "configs/flux/_text_encoder.py"),
                            "--max-size", "7"])
    cfg = tool.load_run_config(args)
    assert cfg.model.text_encoder.max_sequence_length == 512 and cfg.data.train.max_size == 7
    assert np.isclose(cfg.model.lora_alpha, 8)  # everything else is the run config's
