"""FLUX.1 (black-forest-labs/FLUX.1-dev): everything FLUX-specific, registered as family ``flux``."""

from arcflow.models.base import Family
from arcflow.models.flux.backbone import FLUX_DEV_TRANSFORMER, FluxBackbone
from arcflow.models.flux.pipeline import ArcFluxPipeline
from arcflow.models.flux.text_encoder import PretrainedFluxTextEncoder
from arcflow.models.flux.tiny import make_tiny_flux

FAMILY = Family(
    name="flux",
    backbone=FluxBackbone,
    text_encoders={"PretrainedFluxTextEncoder": PretrainedFluxTextEncoder},
    pipeline=ArcFluxPipeline,
    make_tiny=make_tiny_flux,
    diffusers_pipelines=("FluxPipeline",),
    full_size=FLUX_DEV_TRANSFORMER,
    eval_teacher_steps=50,  # FluxPipeline's FLUX.1-dev evaluation setting, guidance 3.5 (model.guidance)
)

__all__ = ["FAMILY", "ArcFluxPipeline", "FluxBackbone", "PretrainedFluxTextEncoder", "make_tiny_flux"]
