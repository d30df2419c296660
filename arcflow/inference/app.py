"""``arcflow app``: a local web page (Gradio) to try an ArcFlow student against its teacher.

    arcflow app --base assets/demo_teacher --adapter adapters/arcflux-demo     # http://127.0.0.1:7860

One pipeline serves both: the student is the adapter loaded on the base model, the teacher the same
pipeline with the adapter unloaded (weight for weight, so no second copy of the model is held). The
page shows each image with the seconds its call took, so the two can be compared on this machine.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import torch

from arcflow.models import get_family
from arcflow.models.adapter import CONFIG_FILE, AdapterConfig, adapter_file
from arcflow.models.hub import require_pretrained

STUDENT, TEACHER = "ArcFlow student", "teacher"
TEACHER_STEPS = 50
"""Default steps of the teacher: the comparison point of the speed-up (benchmarks/inference_speed.py)."""


@dataclass
class Result:
    image: Any
    seconds: float
    label: str


class Playground:
    """The pipeline behind the page, switched between student and teacher as requests ask."""

    def __init__(self, base: str, adapter: str, device: str | None = None, dtype: str | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch_dtype = getattr(torch, dtype or ("bfloat16" if self.device.type == "cuda" else "float32"))
        self.adapter = adapter
        self.config = AdapterConfig.load(adapter_file(adapter, CONFIG_FILE))
        require_pretrained(base, "--base")
        self.pipe = get_family(self.config.family).pipeline.from_pretrained(base, dtype=torch_dtype).to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.pipe.load_arcflow_adapter(adapter)
        self.timings: dict[str, str] = {}

    @property
    def default_size(self) -> tuple[int, int]:
        return self.config.default_size or (1024, 1024)

    def generate(self, prompt: str, seed: int, height: int, width: int, nfe: int, sampler: str,
                 teacher_steps: int = TEACHER_STEPS) -> Result:
        """One image of ``sampler`` (student or teacher) and the seconds the call took (not the switch)."""
        if not prompt.strip():
            raise ValueError("enter a prompt")
        student = sampler == STUDENT
        if student and self.pipe.arcflow_config is None:
            self.pipe.load_arcflow_adapter(self.adapter)
        if not student and self.pipe.arcflow_config is not None:
            self.pipe.unload_arcflow_adapter()
        steps = int(nfe) if student else int(teacher_steps)
        # Same text length and guidance for both, so the comparison is of the samplers alone.
        call = dict(height=int(height), width=int(width), num_inference_steps=steps,
                    max_sequence_length=self.config.max_sequence_length, guidance_scale=self.config.guidance,
                    generator=torch.Generator().manual_seed(int(seed)))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        image = self.pipe(prompt, **call).images[0]
        seconds = time.perf_counter() - start
        label = f"{sampler}, {steps} {'NFE' if student else 'steps'}"
        self.timings[sampler] = f"{label}: {seconds:.2f} s"
        return Result(image, seconds, label)

    def timing_text(self) -> str:
        return " | ".join(self.timings[name] for name in (STUDENT, TEACHER) if name in self.timings)


def build_page(playground: Playground) -> Any:
    """The Gradio page: prompt, seed, size, NFE, the student/teacher toggle, the image and the timings."""
    import gradio as gr

    height, width = playground.default_size
    config = playground.config
    with gr.Blocks(title="ArcFlow", analytics_enabled=False) as page:
        gr.Markdown(f"## ArcFlow: {config.nfe}-NFE student of `{config.base_model}`")
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt",
                                    value="a large red circle on the left on a white background")
                sampler = gr.Radio([STUDENT, TEACHER], value=STUDENT, label="Sampler", elem_id="sampler")
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, label="Seed", elem_id="seed")
                    nfe = gr.Slider(2, 8, value=config.nfe, step=1, label="Student NFE", elem_id="nfe")
                    steps = gr.Slider(2, 100, value=TEACHER_STEPS, step=1, label="Teacher steps")
                with gr.Row():
                    h = gr.Slider(64, 2048, value=height, step=16, label="Height", elem_id="height")
                    w = gr.Slider(64, 2048, value=width, step=16, label="Width", elem_id="width")
                run = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column():
                image = gr.Image(label="Image", type="pil", elem_id="image", format="png", height=384)
                timing = gr.Markdown(elem_id="timing")

        def on_click(text: str, seed_value: float, height_value: float, width_value: float, nfe_value: float,
                     mode: str, teacher_steps: float) -> tuple[Any, str]:
            try:
                result = playground.generate(text, int(seed_value), int(height_value), int(width_value),
                                             int(nfe_value), mode, int(teacher_steps))
            except ValueError as err:
                raise gr.Error(str(err)) from None
            return result.image, playground.timing_text()

        run.click(on_click, [prompt, seed, h, w, nfe, sampler, steps], [image, timing])
    return page


def serve(base: str, adapter: str, host: str = "127.0.0.1", port: int = 7860, device: str | None = None,
          dtype: str | None = None) -> None:
    """Load the models, then serve the page until interrupted."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no network calls from the server
    playground = Playground(base, adapter, device, dtype)
    print(f"ArcFlow app on http://{host}:{port} ({playground.config.nfe}-NFE student of {base})", flush=True)
    build_page(playground).launch(server_name=host, server_port=port, share=False, show_error=True)
