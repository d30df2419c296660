"""Bad input is one clear line naming the key, file or value, found before any model loads."""

import sys
from pathlib import Path

import pytest

from arcflow.cli import main
from arcflow.config import ConfigError, load_config
from arcflow.data.prompt_sources import read_source
from arcflow.distributed import init_distributed
from arcflow.training import checkpoint as ckpt

sys.path.insert(0, str(Path(__file__).parent))
from test_train_e2e import DEMO, REPO, train


@pytest.mark.parametrize("key, value, words", [
    ("model.num_modes", 0, "must be >= 1"), ("distill.nfe", 0, "must be >= 2"), ("distill.nfe", 1, "must be >= 2"),
    ("train_cfg.batch_size", 0, "must be >= 1"), ("train_cfg.grad_accum_batch_size", 0, "must be >= 1"),
    ("model.lora_dropout", 1.0, "must be in"), ("train_cfg.skip_non_finite_steps", -1, "must be >= 0")])
def test_config_values_name_their_key(key, value, words):
    with pytest.raises(ConfigError, match=rf"config key '{key}': {words}"):
        load_config(REPO / DEMO, {key: value})


def test_syntax_errors_name_the_file_even_in_a_base(tmp_path, capsys):
    broken = tmp_path / "_broken_base.py"
    broken.write_text("model = dict(\n    num_modes=4,\n")
    child = tmp_path / "child.py"
    child.write_text("_base_ = ['./_broken_base.py']\ntotal_iters = 2\n")
    for config in (broken, child):
        with pytest.raises(ConfigError, match=rf"config file '{broken}' line 1: syntax error: '\(' was never closed"):
            load_config(config)
    with pytest.raises(SystemExit, match=rf"^arcflow: error: config file '{broken}' line 1"):
        main(["train", str(child), "--work-dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_empty_and_non_utf8_prompt_files_are_named(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match=f"prompt file {empty} is empty"):
        read_source(str(empty))
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"prompt": "a cat"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=f"prompt file {latin} line 2: not UTF-8 text \\(byte 0xe9 at column 16\\)"):
        read_source(str(latin))


def test_torchrun_without_launcher_pytorch_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
    with pytest.raises(RuntimeError, match="torchrun with 2 processes but with --launcher none"):
        init_distributed("none")
    with pytest.raises(SystemExit, match="^arcflow: error: .*add --launcher pytorch"):
        main(["train", str(REPO / DEMO), "--work-dir", str(tmp_path / "run")])
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun with one process: this process is the whole job
    assert init_distributed("none").world_size == 1


def test_fsdp_config_runs_under_plain_python(tiny_flux_dir, tmp_path):
    import torch.distributed as dist

    records = train(tmp_path / "run", tiny_flux_dir, total_iters=1, save_interval=1, **{"train_cfg.parallel": "fsdp"})
    assert [r["iter"] for r in records] == [1] and not dist.is_initialized()
    assert [i for i, _ in ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")] == [1]
