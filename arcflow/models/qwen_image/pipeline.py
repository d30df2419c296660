"""ArcQwenImagePipeline: Qwen-Image with an ArcFlow student adapter, sampled in n >= 2 evaluations (SPEC §3, §8).

Loading and unloading the adapter is :class:`arcflow.models.adapter.ArcFlowAdapterMixin`;
this file is Qwen-Image's ``__call__`` for the student. The student distilled the teacher's
true CFG into itself, so each step is ONE transformer call on the prompt alone (no negative
prompt, no guidance). Without an adapter the pipeline is exactly ``QwenImagePipeline``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers import QwenImagePipeline
from diffusers.pipelines.qwenimage.pipeline_output import QwenImagePipelineOutput
from diffusers.utils.torch_utils import get_module_execution_device

from arcflow.models.adapter import ArcFlowAdapterMixin
from arcflow.models.base import PATCH

TEACHER_DEFAULT_TEXT_LENGTH = 512
"""QwenImagePipeline's default text length, used without an adapter (or with a format-1 one)."""


class ArcQwenImagePipeline(ArcFlowAdapterMixin, QwenImagePipeline):
    """Qwen-Image text-to-image in ``num_inference_steps`` ArcFlow student evaluations (2 by default).

    >>> pipe = ArcQwenImagePipeline.from_pretrained("Qwen/Qwen-Image", dtype=torch.bfloat16)
    >>> pipe.load_arcflow_adapter("path/to/adapter")
    >>> image = pipe("a cat", num_inference_steps=2).images[0]
    """

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        timestep_ratio: float | None = None,
        guidance_scale: float | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_embeds_mask: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[..., dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        max_sequence_length: int | None = None,
        **teacher_kwargs: Any,
    ) -> QwenImagePipelineOutput | tuple:
        """Generate with the student: ``num_inference_steps`` (n >= 2) transformer evaluations, nothing more.

        Segments and defaults are as in ``ArcFluxPipeline``: everything left out is what the
        adapter records the student was trained with (evaluations, text length, image size), and
        asking for anything else warns once. ``latents`` are packed (B, N, 64) as in
        QwenImagePipeline and stay float32; ``output_type="latent"`` returns them packed.

        ``guidance_scale`` is the family's teacher guidance, so callers can pass one value to every
        family: the student distilled it (the adapter's value is accepted, another is an error), and
        the teacher runs it as true CFG against the empty prompt. Without an adapter this is
        ``QwenImagePipeline.__call__`` (the teacher), and ``teacher_kwargs`` (``negative_prompt``,
        ``true_cfg_scale``, ``sigmas``, ...) are passed on to it.
        """
        tensor_inputs = list(callback_on_step_end_tensor_inputs or ["latents"])
        if self.arcflow_config is None:
            if timestep_ratio is not None:
                raise ValueError("timestep_ratio needs an ArcFlow adapter; call load_arcflow_adapter() first")
            steps = {} if num_inference_steps is None else {"num_inference_steps": num_inference_steps}
            if guidance_scale is not None:  # the family's teacher guidance: true CFG against the empty prompt
                teacher_kwargs = {"true_cfg_scale": guidance_scale, "negative_prompt": "", **teacher_kwargs}
            return super().__call__(
                prompt=prompt, height=height, width=width, num_images_per_prompt=num_images_per_prompt,
                generator=generator, latents=latents, prompt_embeds=prompt_embeds,
                prompt_embeds_mask=prompt_embeds_mask, output_type=output_type, return_dict=return_dict,
                attention_kwargs=attention_kwargs, callback_on_step_end=callback_on_step_end,
                callback_on_step_end_tensor_inputs=tensor_inputs,
                max_sequence_length=max_sequence_length or TEACHER_DEFAULT_TEXT_LENGTH, **steps, **teacher_kwargs)
        if teacher_kwargs:
            raise TypeError(f"{sorted(teacher_kwargs)} only apply to the multi-step teacher, not the ArcFlow student "
                            "(it distilled the teacher's CFG: no negative prompt, no guidance)")
        config = self.arcflow_config
        if guidance_scale is not None and guidance_scale != config.guidance:
            raise ValueError(f"guidance_scale={guidance_scale}: this student distilled its teacher's true CFG at "
                             f"{config.guidance} and takes no guidance input; leave guidance_scale out")
        self.check_arcflow_active()
        bounds, height, width, max_sequence_length = self.student_schedule(
            num_inference_steps, timestep_ratio, height, width, max_sequence_length, TEACHER_DEFAULT_TEXT_LENGTH)
        self.warn_outside_training(
            size=(height, width), nfe=len(bounds), timestep_ratio=timestep_ratio,
            max_sequence_length=max_sequence_length if prompt_embeds is None else None)
        self.check_inputs(prompt, height, width, prompt_embeds=prompt_embeds, prompt_embeds_mask=prompt_embeds_mask,
                          callback_on_step_end_tensor_inputs=tensor_inputs, max_sequence_length=max_sequence_length)
        self._attention_kwargs = attention_kwargs or {}
        self._current_timestep = None
        self._interrupt = False

        device = self._execution_device
        prompt_embeds, prompt_embeds_mask = self.encode_prompt(
            prompt=prompt, prompt_embeds=prompt_embeds, prompt_embeds_mask=prompt_embeds_mask, device=device,
            num_images_per_prompt=num_images_per_prompt, max_sequence_length=max_sequence_length)
        batch = prompt_embeds.shape[0]
        # The state stays float32 between evaluations, as in the trainer's sampler.
        latents = self.prepare_latents(batch, self.transformer.config.in_channels // 4, height, width,
                                       torch.float32, device, generator, latents)
        latent_h = 2 * (int(height) // (self.vae_scale_factor * 2))
        latent_w = 2 * (int(width) // (self.vae_scale_factor * 2))
        img_shapes = [[(1, latent_h // PATCH, latent_w // PATCH)]] * batch
        dtype = self.transformer.dtype

        def predict(state: torch.Tensor, sigma: torch.Tensor, prompt_embeds: torch.Tensor) -> torch.Tensor:
            return self.transformer(
                hidden_states=state.to(dtype), timestep=sigma, encoder_hidden_states=prompt_embeds.to(dtype),
                encoder_hidden_states_mask=prompt_embeds_mask, img_shapes=img_shapes,
                attention_kwargs=self._attention_kwargs, return_dict=False)[0]

        latents = self.run_student(latents, bounds, height, width, prompt_embeds, predict, callback_on_step_end,
                                   tensor_inputs)

        if output_type == "latent":
            image = latents
        else:
            image = self.image_processor.postprocess(self._decode(latents, height, width), output_type=output_type)
        self.maybe_free_model_hooks()
        return QwenImagePipelineOutput(images=image) if return_dict else (image,)

    def _decode(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Packed latents -> images in [-1, 1], exactly as QwenImagePipeline un-normalises and decodes them."""
        vae = self.vae
        x = self._unpack_latents(latents, height, width, self.vae_scale_factor)
        x = x.to(device=get_module_execution_device(vae), dtype=vae.dtype)
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(x.device, x.dtype)
        std = torch.tensor(vae.config.latents_std).view(shape).to(x.device, x.dtype)
        return vae.decode(x * std + mean, return_dict=False)[0][:, :, 0]
