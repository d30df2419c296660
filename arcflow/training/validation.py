"""Validation: teacher-alignment of the few-NFE student, with images to look at.

Fixed prompts and fixed per-sample noise, so figures and grids are comparable across
iterations and runs. The teacher's references (its multi-step sample and its own few-step
Euler sample) never change during a run and are computed once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from arcflow.config import DistillConfig, ValConfig
from arcflow.data.batches import Prompt
from arcflow.images import psnr, save_grid
from arcflow.method.sampling import sample_student, sample_teacher
from arcflow.models.base import Backbone, Conditioning

EncodeFn = Callable[[list[str]], Conditioning]


def fixed_noise(prompts: list[Prompt], backbone: Backbone, seed: int) -> list[Tensor]:
    """One noise tensor per prompt, from its own seed: independent of batching."""
    noise = []
    for index, prompt in enumerate(prompts):
        generator = torch.Generator().manual_seed(seed * 100_003 + index)
        noise.append(torch.randn(backbone.latent_shape(prompt.height, prompt.width), generator=generator))
    return noise


@dataclass
class _Sample:
    latents: Tensor
    images: Tensor


class Validator:
    """Samples the validation prompts and writes ``grid.png`` + ``metrics.json`` per call."""

    def __init__(self, backbone: Backbone, vae: nn.Module, encode: EncodeFn, prompts: list[Prompt],
                 cfg: ValConfig, distill: DistillConfig, device: torch.device):
        self.backbone, self.vae, self.encode = backbone, vae, encode
        self.prompts = prompts[:cfg.num_prompts]
        self.cfg, self.distill, self.device = cfg, distill, device
        self.noise = fixed_noise(self.prompts, backbone, cfg.seed)
        self._references: dict[str, list[_Sample]] | None = None

    def _batches(self) -> list[list[int]]:
        """Indices grouped by image size, in chunks of the validation batch size."""
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, p in enumerate(self.prompts):
            by_size.setdefault((p.height, p.width), []).append(i)
        bs = self.cfg.batch_size
        return [idx[i:i + bs] for idx in by_size.values() for i in range(0, len(idx), bs)]

    def _sample_all(self, sampler: Callable[[Tensor, Conditioning], Tensor]) -> list[_Sample]:
        out: list[_Sample | None] = [None] * len(self.prompts)
        for batch in self._batches():
            cond = self.encode([self.prompts[i].text for i in batch])
            noise = torch.stack([self.noise[i] for i in batch]).to(self.device)
            latents = sampler(noise, cond)
            images = self.backbone.decode(self.vae, latents)
            for j, i in enumerate(batch):
                out[i] = _Sample(latents[j].float().cpu(), images[j].float().cpu())
        return out

    def references(self) -> dict[str, list[_Sample]]:
        if self._references is None:
            shift, n_ref = self.distill.shift, self.cfg.teacher_steps
            self._references = {
                f"teacher_{n_ref}step": self._sample_all(lambda z, c: sample_teacher(self.backbone, z, c, n_ref, shift))
            }
            for nfe in self.cfg.nfe:
                self._references[f"teacher_euler_{nfe}step"] = self._sample_all(
                    lambda z, c, n=nfe: sample_teacher(self.backbone, z, c, n, shift))
        return self._references

    def run(self, out_dir: Path, write: bool = True) -> dict[str, float]:
        """Sample the student (current weights) at each validation NFE; compare with the teacher.

        Every rank samples (sharded models need all ranks); only ``write`` ranks save files.
        """
        refs = self.references()
        target_name = f"teacher_{self.cfg.teacher_steps}step"
        target = refs[target_name]
        students = {
            f"student_{nfe}nfe": self._sample_all(lambda z, c, n=nfe: sample_student(
                self.backbone, z, c, n, self.distill.shift, self.distill.timestep_ratio))
            for nfe in self.cfg.nfe
        }
        metrics: dict[str, float] = {}
        for name, samples in {**students, **{k: v for k, v in refs.items() if k != target_name}}.items():
            mse = [float((s.latents - t.latents).pow(2).mean()) for s, t in zip(samples, target)]
            gains = [float(psnr(s.images[None], t.images[None])[0]) for s, t in zip(samples, target)]
            metrics[f"{name}/latent_mse"] = sum(mse) / len(mse)
            metrics[f"{name}/psnr"] = sum(gains) / len(gains)
        if not write:
            return metrics
        out_dir.mkdir(parents=True, exist_ok=True)
        columns = [target] + list(students.values()) + [refs[f"teacher_euler_{n}step"] for n in self.cfg.nfe]
        save_grid([[col[i].images for col in columns] for i in range(len(self.prompts))], out_dir / "grid.png")
        legend = [target_name] + list(students) + [f"teacher_euler_{n}step" for n in self.cfg.nfe]
        record = {"columns": legend, "prompts": [p.text for p in self.prompts], "metrics": metrics}
        tmp = out_dir / "metrics.json.tmp"
        tmp.write_text(json.dumps(record, indent=1))
        tmp.replace(out_dir / "metrics.json")
        return metrics
