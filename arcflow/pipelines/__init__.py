"""The ArcFlow diffusers pipelines of every registered family (``ArcFluxPipeline``, ...) and ``AdapterConfig``.

Attributes are resolved on first use through :mod:`arcflow.models`' registry, so importing
this package costs nothing until a pipeline is asked for.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    from arcflow.models import FAMILIES, get_family
    from arcflow.models.adapter import AdapterConfig

    if name == "AdapterConfig":
        return AdapterConfig
    for family in FAMILIES:
        pipeline = get_family(family).pipeline
        if pipeline.__name__ == name:
            return pipeline
    raise AttributeError(f"module 'arcflow.pipelines' has no attribute '{name}'")
