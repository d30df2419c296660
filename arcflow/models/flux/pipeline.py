"""ArcFluxPipeline: FLUX.1 with an ArcFlow student adapter, sampled in n >= 2 evaluations (SPEC §3).

Loading and unloading the adapter is :class:`arcflow.models.adapter.ArcFlowAdapterMixin`;
this file is FLUX's ``__call__`` for the student. Without an adapter the pipeline is exactly
``FluxPipeline``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from diffusers import FluxPipeline
from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput
from diffusers.utils.torch_utils import get_module_execution_device

from arcflow.models.adapter import ArcFlowAdapterMixin

TEACHER_DEFAULT_STEPS = 28
"""FluxPipeline's default, used when no adapter is loaded."""
TEACHER_DEFAULT_TEXT_LENGTH = 512
"""FluxPipeline's default T5 length, used without an adapter (or with a format-1 one, which does not record it)."""


class ArcFluxPipeline(ArcFlowAdapterMixin, FluxPipeline):
    """FLUX.1 text-to-image in ``num_inference_steps`` ArcFlow student evaluations (2 by default).

    >>> pipe = ArcFluxPipeline.from_pretrained("black-forest-labs/FLUX.1-dev", dtype=torch.bfloat16)
    >>> pipe.load_arcflow_adapter("path/to/adapter")
    >>> image = pipe("a cat", num_inference_steps=2).images[0]
    """

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        timestep_ratio: float | None = None,
        guidance_scale: float | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[..., dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        max_sequence_length: int | None = None,
        **teacher_kwargs: Any,
    ) -> FluxPipelineOutput | tuple:
        """Generate with the student: ``num_inference_steps`` (n >= 2) transformer evaluations, nothing more.

        Segments in raw time are D, ..., D, r*D with D = 1 / (n - 1 + r), r = ``timestep_ratio``
        (default: the adapter's); each evaluation's policy is integrated exactly over its segment
        on the adapter's fixed shift. Every setting left out is the one the student was trained
        with, as its adapter records: guidance, number of evaluations, T5 text length
        (``max_sequence_length``) and image size (the most frequent training size); asking for
        anything else works but warns once, since the student never saw it. ``latents`` are packed
        (B, N, 64) as in FluxPipeline and stay float32 throughout; ``output_type="latent"`` returns
        them packed, in float32.

        Without an adapter this is ``FluxPipeline.__call__`` (the teacher), and ``teacher_kwargs``
        (``sigmas``, ``negative_prompt``, ``true_cfg_scale``, ...) are passed on to it.
        """
        tensor_inputs = list(callback_on_step_end_tensor_inputs or ["latents"])
        if self.arcflow_config is None:
            if timestep_ratio is not None:
                raise ValueError("timestep_ratio needs an ArcFlow adapter; call load_arcflow_adapter() first")
            return super().__call__(
                prompt=prompt, prompt_2=prompt_2, height=height, width=width,
                num_inference_steps=num_inference_steps or TEACHER_DEFAULT_STEPS,
                guidance_scale=3.5 if guidance_scale is None else guidance_scale,
                num_images_per_prompt=num_images_per_prompt, generator=generator, latents=latents,
                prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds, output_type=output_type,
                return_dict=return_dict, joint_attention_kwargs=joint_attention_kwargs,
                callback_on_step_end=callback_on_step_end, callback_on_step_end_tensor_inputs=tensor_inputs,
                max_sequence_length=max_sequence_length or TEACHER_DEFAULT_TEXT_LENGTH, **teacher_kwargs)
        if teacher_kwargs:
            raise TypeError(f"{sorted(teacher_kwargs)} only apply to the multi-step teacher, not the ArcFlow student")
        config = self.arcflow_config
        self.check_arcflow_active()
        bounds, height, width, max_sequence_length = self.student_schedule(
            num_inference_steps, timestep_ratio, height, width, max_sequence_length, TEACHER_DEFAULT_TEXT_LENGTH)
        self.warn_outside_training(
            size=(height, width), nfe=len(bounds), timestep_ratio=timestep_ratio, guidance=guidance_scale,
            max_sequence_length=max_sequence_length if prompt_embeds is None else prompt_embeds.shape[1])
        self.check_inputs(prompt, prompt_2, height, width, prompt_embeds=prompt_embeds,
                          pooled_prompt_embeds=pooled_prompt_embeds,
                          callback_on_step_end_tensor_inputs=tensor_inputs, max_sequence_length=max_sequence_length)
        self._guidance_scale = config.guidance if guidance_scale is None else guidance_scale
        self._joint_attention_kwargs = joint_attention_kwargs or {}
        self._current_timestep = None
        self._interrupt = False

        device = self._execution_device
        prompt_embeds, pooled_prompt_embeds, text_ids = self.encode_prompt(
            prompt=prompt, prompt_2=prompt_2, prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
            device=device, num_images_per_prompt=num_images_per_prompt, max_sequence_length=max_sequence_length,
            lora_scale=self._joint_attention_kwargs.get("scale"))
        batch = prompt_embeds.shape[0]
        # The state stays float32 between evaluations, as in the trainer's sampler.
        latents, image_ids = self.prepare_latents(batch, self.transformer.config.in_channels // 4, height, width,
                                                  torch.float32, device, generator, latents)
        dtype = self.transformer.dtype
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((batch,), self._guidance_scale, device=device, dtype=torch.float32)

        def predict(state: torch.Tensor, sigma: torch.Tensor, prompt_embeds: torch.Tensor) -> torch.Tensor:
            return self.transformer(
                hidden_states=state.to(dtype), timestep=sigma, guidance=guidance,
                pooled_projections=pooled_prompt_embeds.to(dtype), encoder_hidden_states=prompt_embeds.to(dtype),
                txt_ids=text_ids, img_ids=image_ids, joint_attention_kwargs=self._joint_attention_kwargs,
                return_dict=False)[0]

        latents = self.run_student(latents, bounds, height, width, prompt_embeds, predict, callback_on_step_end,
                                   tensor_inputs)

        if output_type == "latent":
            image = latents
        else:
            x = self._unpack_latents(latents, height, width, self.vae_scale_factor)
            x = x / self.vae.config.scaling_factor + self.vae.config.shift_factor
            x = x.to(device=get_module_execution_device(self.vae), dtype=self.vae.dtype)
            image = self.image_processor.postprocess(self.vae.decode(x, return_dict=False)[0], output_type=output_type)
        self.maybe_free_model_hooks()
        return FluxPipelineOutput(images=image) if return_dict else (image,)
