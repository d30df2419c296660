"""Shared fixtures: one tiny offline FLUX.1-dev and one Qwen-Image look-alike per test session."""

from __future__ import annotations

import pathlib

import pytest

from arcflow.models.flux.tiny import make_tiny_flux
from arcflow.models.qwen_image.tiny import make_tiny_qwen_image


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A tiny random FLUX pipeline folder (seed 0), built once because every FLUX test needs one."""
    return make_tiny_flux(tmp_path_factory.mktemp("tiny_flux") / "FLUX.1-dev", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A tiny random Qwen-Image pipeline folder (seed 0), built once for the Qwen-Image tests."""
    return make_tiny_qwen_image(tmp_path_factory.mktemp("tiny_qwen") / "Qwen-Image", seed=0)


def read_checkpoint_group(path: pathlib.Path, group: str) -> dict:
    """All tensors of one group ("model", "ema", "optimizer") of a DCP checkpoint, on CPU."""
    import torch
    import torch.distributed.checkpoint as dcp

    metadata = dcp.FileSystemReader(str(path)).read_metadata()
    template = {key.split(".", 1)[1]: torch.zeros(meta.size, dtype=meta.properties.dtype)
                for key, meta in metadata.state_dict_metadata.items() if key.startswith(group + ".")}
    dcp.load({group: template}, checkpoint_id=str(path))
    return template
