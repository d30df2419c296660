"""Fault injection: flipped or lost bytes in every file kind we write are caught and named, never loaded."""

import random
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from arcflow.checksums import CHECKSUM_FILE, DamagedFile, read_checksums
from arcflow.distributed import DistEnv
from arcflow.models.adapter import CONFIG_FILE, HEADS_FILE, LORA_FILE, adapter_file, read_safetensors
from arcflow.training import checkpoint as ckpt

OFFSETS_PER_FILE = 3


def _tensors(value: float) -> dict:
    return {"model": {"w": torch.full((64, 32), value)}, "ema": {"w": torch.full((64, 32), value + 1)},
            "optimizer": {"w/exp_avg": torch.full((64, 32), value + 2)}}


def flip_byte(file: Path, rng: random.Random) -> int:
    data = bytearray(file.read_bytes())
    offset = rng.randrange(len(data))
    data[offset] ^= 1 << rng.randrange(8)
    file.write_bytes(bytes(data))
    return offset


def _checkpoint_files(tmp_path: Path) -> tuple[Path, list[str]]:
    root = tmp_path / "template"
    ckpt.save_checkpoint(root, 1, _tensors(1.0), {"data": {"epoch": 0}}, DistEnv())
    latest = ckpt.save_checkpoint(root, 2, _tensors(2.0), {"data": {"epoch": 1}}, DistEnv())
    names = sorted(p.name for p in latest.iterdir())
    assert {".metadata", ckpt.STATE_FILE, CHECKSUM_FILE} < set(names) and any(n.endswith(".distcp") for n in names)
    return root, names


def test_flipped_bytes_in_any_checkpoint_file_are_caught_and_resume_falls_back(tmp_path):
    template, names = _checkpoint_files(tmp_path)
    rng = random.Random(12)
    for name in names:
        for trial in range(OFFSETS_PER_FILE):
            root = tmp_path / f"{name}-{trial}"
            shutil.copytree(template, root)
            offset = flip_byte(root / "iter_0000002" / name, rng)
            where = f"{name} at byte {offset}"
            target = _tensors(0.0)
            with pytest.raises(DamagedFile, match=f"'{root / 'iter_0000002'}/{name}'.* damaged") as caught:
                ckpt.load_checkpoint(root / "iter_0000002", target)
            assert torch.equal(target["model"]["w"], torch.zeros(64, 32)), where  # nothing loaded
            with pytest.warns(UserWarning, match=f"{name}.*resuming from an earlier checkpoint"):
                chosen = ckpt.latest_good_checkpoint(root, DistEnv())
            assert chosen == root / "iter_0000001", (where, caught.value)
            # sample / export / eval given the run dir: the same fallback; given the folder, load names the damage
            with pytest.warns(UserWarning, match=f"{name}.*using an earlier checkpoint"):
                assert ckpt.resolve_checkpoint(root) == root / "iter_0000001", where
            assert ckpt.resolve_checkpoint(root / "iter_0000002") == root / "iter_0000002"


def test_truncated_or_missing_shard_is_named(tmp_path):
    template, names = _checkpoint_files(tmp_path)
    shard = next(n for n in names if n.endswith(".distcp"))
    path = template / "iter_0000002"
    with open(path / shard, "r+b") as f:
        f.truncate(100)
    with pytest.raises(DamagedFile, match=f"'{path / shard}' is truncated or extended: 100 bytes"):
        ckpt.load_checkpoint(path, _tensors(0.0))
    (path / shard).unlink()
    with pytest.raises(DamagedFile, match=f"incomplete: missing file '{shard}'"):
        ckpt.load_checkpoint(path, _tensors(0.0))


def test_structural_damage_without_checksums_names_the_cause(tmp_path):
    """A checkpoint of an older arcflow (no checksums): a cut .metadata is damage, not 'does not fit'."""
    template, _ = _checkpoint_files(tmp_path)
    path = template / "iter_0000002"
    (path / CHECKSUM_FILE).unlink()
    metadata = path / ".metadata"
    metadata.write_bytes(metadata.read_bytes()[:-40])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "checkpoint .* records no checksums")
        with pytest.raises(DamagedFile, match=rf"'{metadata}' is damaged: \w+"):
            ckpt.load_checkpoint(path, _tensors(0.0))


def _adapter(folder: Path) -> Path:
    """An adapter folder as export writes it (the files' content does not matter to the checksums)."""
    from arcflow.checksums import write_checksums

    folder.mkdir()
    save_file({"transformer.x.lora_A.weight": torch.ones(4, 8)}, folder / LORA_FILE)
    save_file({"heads.logits.bias": torch.ones(16)}, folder / HEADS_FILE)
    (folder / CONFIG_FILE).write_text('{"num_modes": 4}')
    write_checksums(folder)
    return folder


@pytest.mark.parametrize("name", [LORA_FILE, HEADS_FILE, CHECKSUM_FILE])
def test_flipped_bytes_in_adapter_files_are_named(tmp_path, name):
    """The tensor files are checked; the JSON config (editable by hand, validated key by key) is not."""
    rng = random.Random(name)
    for trial in range(OFFSETS_PER_FILE):
        folder = _adapter(tmp_path / f"a{trial}")
        flip_byte(folder / name, rng)
        damaged = folder / name
        for wanted in (LORA_FILE, HEADS_FILE):
            if wanted == name or name == CHECKSUM_FILE:
                with pytest.raises(DamagedFile, match=f"'{damaged}'.* damaged"):
                    adapter_file(folder, wanted)
            else:
                assert adapter_file(folder, wanted) == folder / wanted
        assert adapter_file(folder, CONFIG_FILE) == folder / CONFIG_FILE


def test_truncated_lora_without_checksums_names_the_file(tmp_path):
    folder = _adapter(tmp_path / "a")
    (folder / CHECKSUM_FILE).unlink()
    lora = folder / LORA_FILE
    lora.write_bytes(lora.read_bytes()[:-7])
    with pytest.raises(ValueError, match=f"'{lora}' is not a readable safetensors file"):
        read_safetensors(adapter_file(folder, LORA_FILE))


def test_checksum_cost_benchmark_projects_the_flux_checkpoint(capsys):
    import importlib.util

    script = Path(__file__).parents[1] / "benchmarks" / "checksum_cost.py"
    spec = importlib.util.spec_from_file_location("checksum_cost", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--mib", "4"])
    assert result["trainable_params"] > 5e8  # LoRA rank 256 on FLUX.1-dev, K = 16 heads
    assert result["checkpoint_gib"] == pytest.approx(16 * result["trainable_params"] / 2**30)
    assert result["projected_checksum_s"] == pytest.approx(result["checkpoint_gib"] / result["checksum_gib_s"])


def test_a_checkpoint_is_hashed_once_per_process_until_a_file_changes(tmp_path, monkeypatch):
    """``sample``/``export`` pick a checkpoint (checking it) and then load it: its files are hashed once."""
    import arcflow.checksums

    template, _ = _checkpoint_files(tmp_path)
    hashed: list[str] = []
    real = arcflow.checksums.file_sha256
    monkeypatch.setattr(arcflow.checksums, "file_sha256", lambda path: hashed.append(path.name) or real(path))
    latest = template / "iter_0000002"
    assert ckpt.resolve_checkpoint(template) == latest
    files = len(hashed)
    assert files == len(read_checksums(latest)) > 0
    ckpt.load_checkpoint(latest, _tensors(0.0))
    assert len(hashed) == files
    shard = next(latest.glob("*.distcp"))
    flip_byte(shard, random.Random(0))
    with pytest.raises(DamagedFile, match=shard.name):
        ckpt.load_checkpoint(latest, _tensors(0.0))
