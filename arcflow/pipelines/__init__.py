"""Inference on diffusers: the ArcFlow student as a FLUX pipeline, loaded from an exported adapter.

Attributes are imported on first use, so the light command-line parts of this package
(:mod:`arcflow.pipelines.commands`) do not pull in diffusers' pipelines.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {"ArcFluxPipeline": "arcflow.pipelines.pipeline_arcflux", "AdapterConfig": "arcflow.pipelines.adapter"}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'arcflow.pipelines' has no attribute '{name}'")
    return getattr(importlib.import_module(_LAZY[name]), name)
