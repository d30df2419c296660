"""Checkpoint files: DCP round trip, atomicity, keep policy, resolving a run dir, safe metadata."""

import pickle

import pytest
import torch

from arcflow.distributed import DistEnv
from arcflow.training import checkpoint as ckpt


def tensors(seed):
    g = torch.Generator().manual_seed(seed)
    return {"model": {"w": torch.randn(3, 2, generator=g)}, "ema": {"w": torch.randn(3, 2, generator=g)},
            "optimizer": {"w/exp_avg": torch.randn(3, 2, generator=g), "w/step": torch.tensor(5.0)}}


def save(root, iteration, seed=0):
    return ckpt.save_checkpoint(root, iteration, tensors(seed), {"sampler": {"epoch": 1}}, DistEnv())


def test_round_trip_in_place(tmp_path):
    path = save(tmp_path, 5, seed=1)
    target = tensors(seed=2)
    state = ckpt.load_checkpoint(path, target)
    assert state["iteration"] == 5 and state["sampler"] == {"epoch": 1}
    expected = tensors(seed=1)
    for group in expected:
        for key in expected[group]:
            assert torch.equal(target[group][key], expected[group][key])


def test_missing_key_is_a_clear_error(tmp_path):
    path = save(tmp_path, 1)
    target = tensors(0)
    target["model"]["other"] = torch.zeros(2)
    with pytest.raises(ValueError, match="does not fit this model"):
        ckpt.load_checkpoint(path, target)


def test_partial_folders_are_ignored(tmp_path):
    save(tmp_path, 10)
    (tmp_path / ".iter_0000020.partial").mkdir()  # a save killed mid-way
    (tmp_path / "iter_0000030").mkdir()  # no state.json
    assert [path.name for _, path in ckpt.list_checkpoints(tmp_path)] == ["iter_0000010"]
    assert ckpt.resolve_checkpoint(tmp_path).name == "iter_0000010"


def test_keep_last_and_keep_every(tmp_path):
    for it in (100, 200, 300, 400, 500):
        save(tmp_path, it)
    ckpt.prune_checkpoints(tmp_path, keep_last=1, keep_every=200)
    assert [i for i, _ in ckpt.list_checkpoints(tmp_path)] == [200, 400, 500]


def test_incomplete_checkpoint_is_named(tmp_path):
    path = save(tmp_path, 1)
    (path / ".metadata").unlink()
    with pytest.raises(ckpt.CheckpointDamaged, match=r"missing file .\.metadata"):
        ckpt.load_checkpoint(path, tensors(0))


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_tampered_metadata_is_refused(tmp_path):
    path = save(tmp_path, 1)
    (path / ".metadata").write_bytes(pickle.dumps(_Payload()))
    ckpt.write_checksums(path)  # as an attacker would
    with pytest.raises(ValueError, match="builtins.print"):
        ckpt.load_checkpoint(path, tensors(0))
