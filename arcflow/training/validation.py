"""Validation: teacher-alignment of the few-NFE student, with images to look at.

Fixed prompts and fixed per-sample noise, so figures and grids are comparable across
iterations and runs. The teacher's references (its multi-step sample and its own few-step
Euler sample) never change during a run and are computed once.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from arcflow.config import DistillConfig, EvalConfig, ValConfig
from arcflow.data.batches import Prompt
from arcflow.images import psnr, save_grid, to_uint8
from arcflow.method.sampling import sample_student, sample_teacher
from arcflow.metrics.suite import MetricSuite, Pairs
from arcflow.models.base import Backbone, Conditioning

EncodeFn = Callable[[list[str]], Conditioning]
log = logging.getLogger("arcflow")


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
                 cfg: ValConfig, distill: DistillConfig, device: torch.device, eval_cfg: EvalConfig | None = None):
        self.backbone, self.vae, self.encode = backbone, vae, encode
        self.prompts = prompts[:cfg.num_prompts]
        self.cfg, self.distill, self.device = cfg, distill, device
        self.eval_cfg = eval_cfg or EvalConfig()
        self.noise = fixed_noise(self.prompts, backbone, cfg.seed)
        self._references: dict[str, list[_Sample]] | None = None
        self._suite: MetricSuite | None = None

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
        if self.cfg.metrics:
            for name, samples in students.items():
                values = self.evaluation_metrics(samples, target)
                metrics.update({f"{name}/{key}": value for key, value in values.items()})
        out_dir.mkdir(parents=True, exist_ok=True)
        columns = [target] + list(students.values()) + [refs[f"teacher_euler_{n}step"] for n in self.cfg.nfe]
        legend = [target_name] + list(students) + [f"teacher_euler_{n}step" for n in self.cfg.nfe]
        labels = [f"teacher {self.cfg.teacher_steps}-step"] + [f"student {n}-NFE" for n in self.cfg.nfe] + [
            f"teacher {n}-step Euler" for n in self.cfg.nfe]
        save_grid([[col[i].images for col in columns] for i in range(len(self.prompts))], out_dir / "grid.png",
                  column_labels=labels, row_captions=[p.text for p in self.prompts])
        record = {"columns": legend, "prompts": [p.text for p in self.prompts], "metrics": metrics}
        tmp = out_dir / "metrics.json.tmp"
        tmp.write_text(json.dumps(record, indent=1))
        tmp.replace(out_dir / "metrics.json")
        return metrics

    def evaluation_metrics(self, samples: list[_Sample], target: list[_Sample]) -> dict[str, float]:
        """``val_cfg.metrics`` of arcflow.evaluation on the first ``metrics_num_prompts`` prompts (those computable).

        The metric networks are loaded once; those that cannot be (library or weights missing) are
        logged once with the reason and left out, so TensorBoard only ever shows real numbers.
        """
        if self._suite is None:
            groups = tuple(group for group in self.cfg.metrics if group != "alignment")  # run() has it already
            self._suite = MetricSuite.build(self.eval_cfg, groups, self.device)
            for name, reason in sorted(self._suite.unavailable.items()):
                log.warning("val_cfg.metrics: %s unavailable: %s", name, reason)
        suite = MetricSuite(self._suite.metrics, {})
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i in range(min(self.cfg.metrics_num_prompts, len(self.prompts))):
            by_shape.setdefault(tuple(samples[i].images.shape), []).append(i)
        size = self.eval_cfg.feature_batch_size
        for indices in by_shape.values():
            for chosen in (indices[i:i + size] for i in range(0, len(indices), size)):
                stack = lambda parts, field: torch.stack([getattr(parts[i], field) for i in chosen])  # noqa: E731
                suite.update(Pairs([self.prompts[i].text for i in chosen],
                                   to_uint8(stack(samples, "images")).to(self.device),
                                   to_uint8(stack(target, "images")).to(self.device),
                                   stack(samples, "latents"), stack(target, "latents")))
        values, _ = suite.compute(suite.state())
        return {key: value for key, value in values.items() if value is not None}
