"""Checkpoint files: round trip, atomicity, keep policy, resolving a run dir."""

import torch

from arcflow import checkpoint as ckpt


def save(root, iteration):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    params = dict(model.named_parameters())
    return ckpt.save_checkpoint(root, iteration, params, params, opt.state_dict(),
                                ckpt.rng_state(torch.Generator().manual_seed(1)), {"sampler": {"epoch": 1}}), opt


def test_round_trip(tmp_path):
    path, opt = save(tmp_path, 5)
    data = ckpt.load_checkpoint(path)
    assert data["state"]["iteration"] == 5 and data["state"]["sampler"] == {"epoch": 1}
    restored = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=0.1)
    restored.load_state_dict(data["optimizer"])
    for a, b in zip(opt.state_dict()["state"].values(), restored.state_dict()["state"].values()):
        for key in a:
            torch.testing.assert_close(a[key], b[key])


def test_partial_folders_are_ignored(tmp_path):
    save(tmp_path, 10)
    (tmp_path / ".iter_0000020.abc").mkdir()  # a save killed mid-way
    (tmp_path / "iter_0000030").mkdir()  # no state.json
    assert ckpt.latest_checkpoint(tmp_path).name == "iter_0000010"
    assert ckpt.resolve_checkpoint(tmp_path).name == "iter_0000010"
    assert ckpt.resolve_checkpoint(tmp_path.parent / tmp_path.name).name == "iter_0000010"


def test_keep_last_and_keep_every(tmp_path):
    for it in (100, 200, 300, 400, 500):
        save(tmp_path, it)
    ckpt.prune_checkpoints(tmp_path, keep_last=1, keep_every=200)
    assert [i for i, _ in ckpt.list_checkpoints(tmp_path)] == [200, 400, 500]


def test_incomplete_checkpoint_is_named(tmp_path):
    path, _ = save(tmp_path, 1)
    (path / "ema.safetensors").unlink()
    try:
        ckpt.load_checkpoint(path)
    except FileNotFoundError as err:
        assert "ema.safetensors" in str(err)
    else:
        raise AssertionError("expected FileNotFoundError")
