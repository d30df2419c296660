"""Qwen-Image (Qwen/Qwen-Image): everything Qwen-Image-specific, registered as family ``qwen_image``."""

from arcflow.models.base import Family
from arcflow.models.qwen_image.backbone import QWEN_IMAGE_TRANSFORMER, QwenImageBackbone
from arcflow.models.qwen_image.pipeline import ArcQwenImagePipeline
from arcflow.models.qwen_image.text_encoder import PretrainedQwenImageTextEncoder
from arcflow.models.qwen_image.tiny import make_tiny_qwen_image

FAMILY = Family(
    name="qwen_image",
    backbone=QwenImageBackbone,
    text_encoders={"PretrainedQwenImageTextEncoder": PretrainedQwenImageTextEncoder},
    pipeline=ArcQwenImagePipeline,
    make_tiny=make_tiny_qwen_image,
    diffusers_pipelines=("QwenImagePipeline",),
    full_size=QWEN_IMAGE_TRANSFORMER,
    eval_teacher_steps=50,  # QwenImagePipeline's default, with true CFG 4.0 (model.guidance)
)

__all__ = ["FAMILY", "ArcQwenImagePipeline", "PretrainedQwenImageTextEncoder", "QwenImageBackbone",
           "make_tiny_qwen_image"]
