"""Score samplers of a synthetic-scenes teacher on held-out scenes: the demo's and the results' table.

Every sampler starts from the same noises and captions and is compared with the teacher's
128-step Euler samples (latent MSE, image PSNR), and its images are read back by the scene
detector (:mod:`arcflow.demo.synthetic`) to check that they follow the caption.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from arcflow.demo import synthetic
from arcflow.demo.teacher_training import EVAL_SEED
from arcflow.images import psnr
from arcflow.method.sampling import sample_student, sample_teacher
from arcflow.models.base import Backbone

NOISE_SEED = 1234
REFERENCE_STEPS = 128
TEACHER_STEPS = (2, 4, 8)

Sampler = Callable[[Tensor, dict[str, Tensor]], Tensor]


class SceneBench:
    """Held-out scenes ``0..n-1`` of scene set :data:`EVAL_SEED`, fixed noises, and the teacher's reference."""

    def __init__(self, teacher: Backbone, text_encoder: nn.Module, vae: nn.Module, num_prompts: int,
                 height: int, width: int, shift: float, batch_size: int = 64):
        self.teacher, self.vae, self.shift, self.batch_size = teacher, vae, shift, batch_size
        self.scenes = [synthetic.make_scene(EVAL_SEED, index) for index in range(num_prompts)]
        device = next(teacher.parameters()).device
        shape = teacher.latent_shape(height, width)
        self.noise = torch.randn((num_prompts, *shape), generator=torch.Generator().manual_seed(NOISE_SEED)).to(device)
        with torch.no_grad():
            self.cond = text_encoder.encode([scene.caption for scene in self.scenes])
        self.reference = self.run(lambda z, c: sample_teacher(teacher, z, c, REFERENCE_STEPS, shift))
        self.images: dict[str, Tensor] = {}

    @torch.no_grad()
    def run(self, sampler: Sampler) -> dict[str, Tensor]:
        """Latents and decoded images of ``sampler`` on every held-out scene, in batches."""
        latents, images = [], []
        for begin in range(0, len(self.scenes), self.batch_size):
            part = slice(begin, begin + self.batch_size)
            z = sampler(self.noise[part], {key: value[part] for key, value in self.cond.items()})
            latents.append(z)
            images.append(self.teacher.decode(self.vae, z).float().cpu())
        return {"latents": torch.cat(latents), "images": torch.cat(images)}

    def score(self, name: str, nfe: int, sampler: Sampler | None = None) -> dict[str, object]:
        """One table row; ``sampler=None`` scores the reference itself (its PSNR is infinite: ``None``)."""
        out = self.reference if sampler is None else self.run(sampler)
        self.images[name] = out["images"]
        pixels = (out["images"].permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
        found = synthetic.accuracies(self.scenes, list(pixels))
        return {
            "name": name,
            "nfe": nfe,
            "latent_mse": float((out["latents"] - self.reference["latents"]).pow(2).mean()),
            "psnr": None if sampler is None else float(psnr(out["images"], self.reference["images"]).mean()),
            **{f"{key}_accuracy": value for key, value in found.items()},
        }

    def teacher_rows(self) -> list[dict[str, object]]:
        """The reference and the teacher's own few-step Euler samplers."""
        rows = [self.score(f"teacher_euler_{REFERENCE_STEPS}step", REFERENCE_STEPS)]
        for steps in TEACHER_STEPS:
            rows.append(self.score(f"teacher_euler_{steps}step", steps,
                                   lambda z, c, n=steps: sample_teacher(self.teacher, z, c, n, self.shift)))
        return rows

    def student_row(self, name: str, student: Backbone, nfe: int, timestep_ratio: float) -> dict[str, object]:
        return self.score(name, nfe, lambda z, c: sample_student(student, z, c, nfe, self.shift, timestep_ratio))


def held_out_captions(num_prompts: int) -> list[str]:
    """Captions of the held-out scenes ``0..n-1`` (``assets/demo_teacher/eval_prompts.jsonl`` lists 256)."""
    return [synthetic.make_scene(EVAL_SEED, index).caption for index in range(num_prompts)]


def prompt_accuracy(prompts: list[str], images: Tensor) -> dict[str, Tensor]:
    """Evaluation hook (``eval_cfg.hooks``): per image, does the detector read back what its caption says?

    ``images`` are uint8 (B, 3, H, W); each value is 1.0 or 0.0, averaged by the evaluation.
    """
    scenes = [synthetic.parse_caption(prompt) for prompt in prompts]
    found = [synthetic.detect(image) for image in images.permute(0, 2, 3, 1).numpy()]
    out = {"prompt_accuracy": [synthetic.prompt_follows(scene, d) for scene, d in zip(scenes, found)]}
    for scene, detection in zip(scenes, found):
        for attribute, ok in synthetic.attribute_matches(scene, detection).items():
            out.setdefault(f"{attribute}_accuracy", []).append(ok)
    return {name: torch.tensor(values, dtype=torch.float64) for name, values in out.items()}


def markdown_table(rows: list[dict[str, object]], where: str) -> str:
    """The rows as the Markdown table of ``docs/results`` and of ``arcflow demo``."""
    lines = [f"Against the teacher's {REFERENCE_STEPS}-step Euler samples on held-out scenes ({where}).", "",
             "| sampler | NFE | latent MSE | PSNR dB | prompt accuracy (colour+shape) | colour | shape | count | position |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        gain = "inf (reference)" if row["psnr"] is None else f"{row['psnr']:.2f}"
        lines.append(f"| {row['name']} | {row['nfe']} | {row['latent_mse']:.4f} | {gain} "
                     f"| {row['prompt_accuracy']:.1%} | {row['colour_accuracy']:.1%} | {row['shape_accuracy']:.1%} "
                     f"| {row['count_accuracy']:.1%} | {row['position_accuracy']:.1%} |")
    return "\n".join(lines) + "\n"
