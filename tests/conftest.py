"""Shared fixtures: one tiny offline FLUX.1-dev look-alike per test session."""

from __future__ import annotations

import pathlib

import pytest

from arcflow.tiny_flux import make_tiny_flux


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A tiny random FLUX pipeline folder (seed 0), built once because every FLUX test needs one."""
    return make_tiny_flux(tmp_path_factory.mktemp("tiny_flux") / "FLUX.1-dev", seed=0)
