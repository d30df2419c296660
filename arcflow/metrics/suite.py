"""The field's metrics over pairs (candidate image, teacher image from the same noise and prompt).

Each metric turns a batch of pairs into per-image rows (features or scores, on the CPU), so
ranks can each score their own share and one rank reduces everything at the end. The
networks are the maintained libraries' own (torch-fidelity's Inception for FID, open_clip,
lpips, hpsv2, ImageReward, built in :mod:`arcflow.metrics.networks`); what they cannot do
for us here (the Fréchet distance of two feature sets) is torch-fidelity's function too.

A metric that cannot be computed (library not installed, weights not on this machine, too few
images) is reported as ``None`` with the reason under ``unavailable``, never computed on
random weights.
"""

from __future__ import annotations

import importlib
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from arcflow.config import EvalConfig

REFERENCE_SUFFIX = "_teacher"
"""Suffix of a per-image quality metric (CLIP, HPSv2, a hook's) measured on the teacher's images."""

Values = dict[str, float | None]
Reasons = dict[str, str]


class MetricUnavailable(Exception):
    """A metric cannot be computed on this machine; the message says why."""


@dataclass
class Pairs:
    """A batch of candidates and their references: one size, uint8 (B, 3, H, W) images on the metric device."""

    prompts: list[str]
    candidate: Tensor
    reference: Tensor
    candidate_latents: Tensor
    reference_latents: Tensor


def as_float(images: Tensor) -> Tensor:
    return images.float() / 255


class Metric(ABC):
    """Per-image rows from pairs, and the reported values from all rows of the evaluation."""

    names: tuple[str, ...]
    """The keys of metrics.json this metric fills."""

    @abstractmethod
    def rows(self, pairs: Pairs) -> dict[str, Tensor]:
        """Per-image rows (first dimension B), on the CPU."""

    @abstractmethod
    def compute(self, rows: dict[str, Tensor]) -> tuple[Values, Reasons]:
        """Values of every name; a None value comes with its reason."""


def _mean(rows: dict[str, Tensor], key: str) -> float | None:
    values = rows.get(key)
    return None if values is None or values.numel() == 0 else float(values.double().mean())


class AlignmentMetric(Metric):
    """What distillation promises: the student's image from the teacher's noise is the teacher's image."""

    names = ("latent_mse", "psnr")

    def rows(self, pairs: Pairs) -> dict[str, Tensor]:
        mse = (pairs.candidate_latents.float() - pairs.reference_latents.float()).pow(2).flatten(1).mean(1)
        pixel_mse = (as_float(pairs.candidate) - as_float(pairs.reference)).pow(2).flatten(1).mean(1)
        psnr = 10 * torch.log10(1 / pixel_mse.clamp(min=1e-10))
        return {"latent_mse": mse.cpu(), "psnr": psnr.cpu()}

    def compute(self, rows: dict[str, Tensor]) -> tuple[Values, Reasons]:
        return {"latent_mse": _mean(rows, "latent_mse"), "psnr": _mean(rows, "psnr")}, {}


# -- FID ------------------------------------------------------------------------------------------
def frechet_distance(features_a: Tensor | np.ndarray, features_b: Tensor | np.ndarray) -> float:
    """FID between two feature sets (N, D), in float64, with torch-fidelity's statistics and distance."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric

    stats = [fid_features_to_statistics(torch.as_tensor(f).double().cpu()) for f in (features_a, features_b)]
    return float(fid_statistics_to_metric(stats[0], stats[1], verbose=False)[KEY_METRIC_FID])


def frechet_distance_to_stats(features: Tensor, mu: np.ndarray, sigma: np.ndarray) -> float:
    """FID of a feature set against precomputed statistics (a real image set's ``mu`` and ``sigma``)."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric

    stats = fid_features_to_statistics(features.double().cpu())
    real = {"mu": mu.astype(np.float64), "sigma": sigma.astype(np.float64)}
    return float(fid_statistics_to_metric(stats, real, verbose=False)[KEY_METRIC_FID])


def centre_crop(images: Tensor, size: int) -> Tensor | None:
    """The native-resolution centre ``size`` x ``size`` patch of each image (None if the images are smaller)."""
    height, width = images.shape[-2:]
    if height < size or width < size:
        return None
    top, left = (height - size) // 2, (width - size) // 2
    return images[..., top:top + size, left:left + size]


class FIDMetric(Metric):
    """FID-T and patch-FID-T (student vs the teacher's images), and FID against real images when given.

    ``inception`` maps uint8 (B, 3, H, W) images of any size to (B, D) features (it resizes to
    its own input size); patch-FID feeds it native-resolution centre crops of ``patch_size``.
    """

    names = ("fid_teacher", "pfid_teacher", "fid_real", "fid_real" + REFERENCE_SUFFIX)

    def __init__(self, inception: Callable[[Tensor], Tensor], patch_size: int,
                 real_stats: tuple[np.ndarray, np.ndarray] | None = None, real_reason: str = ""):
        self.inception, self.patch_size = inception, patch_size
        self.real_stats, self.real_reason = real_stats, real_reason

    @torch.no_grad()
    def rows(self, pairs: Pairs) -> dict[str, Tensor]:
        out = {"fid/candidate": self.inception(pairs.candidate).cpu(),
               "fid/reference": self.inception(pairs.reference).cpu()}
        crops = [centre_crop(images, self.patch_size) for images in (pairs.candidate, pairs.reference)]
        if crops[0] is not None:
            out["pfid/candidate"] = self.inception(crops[0].contiguous()).cpu()
            out["pfid/reference"] = self.inception(crops[1].contiguous()).cpu()
        return out

    def compute(self, rows: dict[str, Tensor]) -> tuple[Values, Reasons]:
        values: Values = dict.fromkeys(self.names)
        reasons: Reasons = {}
        count = len(rows.get("fid/candidate", ()))
        if count < 2:
            return values, dict.fromkeys(self.names, f"FID needs at least 2 images, got {count}")
        values["fid_teacher"] = frechet_distance(rows["fid/candidate"], rows["fid/reference"])
        if "pfid/candidate" in rows and len(rows["pfid/candidate"]) == count:
            values["pfid_teacher"] = frechet_distance(rows["pfid/candidate"], rows["pfid/reference"])
        else:
            reasons["pfid_teacher"] = f"some images are smaller than the {self.patch_size} px patch-FID crop"
        if self.real_stats is None:
            reasons["fid_real"] = reasons["fid_real" + REFERENCE_SUFFIX] = self.real_reason
        else:
            values["fid_real"] = frechet_distance_to_stats(rows["fid/candidate"], *self.real_stats)
            values["fid_real" + REFERENCE_SUFFIX] = frechet_distance_to_stats(rows["fid/reference"], *self.real_stats)
        return values, reasons


# -- per-image scores -----------------------------------------------------------------------------
class PerImageScore(Metric):
    """A score of each image on its own (and its prompt), reported for the candidate and for the teacher."""

    def __init__(self, name: str, score: Callable[[list[str], Tensor], Tensor]):
        self.name, self.score = name, score
        self.names = (name, name + REFERENCE_SUFFIX)

    @torch.no_grad()
    def rows(self, pairs: Pairs) -> dict[str, Tensor]:
        return {self.name: self.score(pairs.prompts, pairs.candidate).float().cpu(),
                self.name + REFERENCE_SUFFIX: self.score(pairs.prompts, pairs.reference).float().cpu()}

    def compute(self, rows: dict[str, Tensor]) -> tuple[Values, Reasons]:
        return {name: _mean(rows, name) for name in self.names}, {}


class LPIPSMetric(Metric):
    """Perceptual distance of the student's image to the teacher's (lpips in [-1, 1] input convention)."""

    names = ("lpips",)

    def __init__(self, network: nn.Module):
        self.network = network

    @torch.no_grad()
    def rows(self, pairs: Pairs) -> dict[str, Tensor]:
        distance = self.network(as_float(pairs.candidate) * 2 - 1, as_float(pairs.reference) * 2 - 1)
        return {"lpips": distance.flatten().cpu()}

    def compute(self, rows: dict[str, Tensor]) -> tuple[Values, Reasons]:
        return {"lpips": _mean(rows, "lpips")}, {}


class HookMetric(Metric):
    """Per-image metrics from ``'module:function'``: ``function(prompts, images) -> {name: (B,) tensor}``.

    ``images`` are uint8 (B, 3, H, W) on the CPU. Every name is averaged over the set and also
    reported for the teacher's images (``name_teacher``). The demo's scene detector plugs in here
    (``arcflow.demo.scene_eval:prompt_accuracy``) without the evaluation depending on the demo.
    """

    def __init__(self, spec: str):
        module, _, function = spec.partition(":")
        try:
            self.function = getattr(importlib.import_module(module), function)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"config key 'eval_cfg.hooks': cannot import {spec!r}: {err}") from None
        self.spec = spec
        self.names = ()

    def rows(self, pairs: Pairs) -> dict[str, Tensor]:
        out = {}
        for suffix, images in (("", pairs.candidate), (REFERENCE_SUFFIX, pairs.reference)):
            for name, values in self.function(pairs.prompts, images.cpu()).items():
                out[name + suffix] = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
        return out

    def compute(self, rows: dict[str, Tensor]) -> tuple[Values, Reasons]:
        return {name: _mean(rows, name) for name in sorted(rows)}, {}


# -- the suite ------------------------------------------------------------------------------------
GROUP_NAMES: dict[str, tuple[str, ...]] = {
    "alignment": AlignmentMetric.names,
    "fid": FIDMetric.names,
    "clip": ("clip_score", "clip_score" + REFERENCE_SUFFIX),
    "lpips": LPIPSMetric.names,
    "hpsv2": ("hpsv2", "hpsv2" + REFERENCE_SUFFIX),
    "image_reward": ("image_reward", "image_reward" + REFERENCE_SUFFIX),
}


class MetricSuite:
    """The configured metrics that can run here, plus the reasons of those that cannot."""

    def __init__(self, metrics: list[Metric], unavailable: Reasons):
        self.metrics, self.unavailable = metrics, dict(unavailable)
        self._rows: dict[str, list[Tensor]] = {}

    @classmethod
    def build(cls, cfg: EvalConfig, groups: tuple[str, ...], device: torch.device) -> "MetricSuite":
        """Load each group's network; a group that cannot load is recorded with its reason."""
        from arcflow.metrics import networks

        builders: dict[str, Callable[[], Metric]] = {
            "alignment": AlignmentMetric,
            "fid": lambda: networks.fid_metric(cfg, device),
            "clip": lambda: PerImageScore("clip_score", networks.clip_scorer(cfg, device)),
            "lpips": lambda: LPIPSMetric(networks.lpips_network(cfg, device)),
            "hpsv2": lambda: PerImageScore("hpsv2", networks.hpsv2_scorer(cfg, device)),
            "image_reward": lambda: PerImageScore("image_reward", networks.image_reward_scorer(cfg, device)),
        }
        metrics, unavailable = [], {}
        for group in groups:
            try:
                metrics.append(builders[group]())
            except MetricUnavailable as why:
                unavailable.update(dict.fromkeys(GROUP_NAMES[group], str(why)))
        metrics.extend(HookMetric(spec) for spec in cfg.hooks)
        return cls(metrics, unavailable)

    def update(self, pairs: Pairs) -> None:
        for metric in self.metrics:
            for key, values in metric.rows(pairs).items():
                self._rows.setdefault(key, []).append(values)

    def state(self) -> dict[str, Tensor]:
        """Every row so far, concatenated (what a rank hands to the reducing rank)."""
        return {key: torch.cat(parts) for key, parts in self._rows.items()}

    def compute(self, state: dict[str, Tensor]) -> tuple[Values, Reasons]:
        values: Values = {}
        reasons = dict(self.unavailable)
        for metric in self.metrics:
            metric_values, metric_reasons = metric.compute(state)
            values.update(metric_values)
            reasons.update(metric_reasons)
        values.update(dict.fromkeys((k for k in self.unavailable if k not in values), None))
        for key, value in values.items():
            if value is not None and not math.isfinite(value):
                values[key], reasons[key] = None, f"not finite ({value})"
        return values, reasons

