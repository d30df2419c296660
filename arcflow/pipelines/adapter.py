"""The ArcFlow adapter folder: what ``arcflow export`` writes and ``ArcFluxPipeline`` reads.

Layout (safetensors and JSON only, no pickle)::

    arcflow_config.json               the policy and how to sample it (:class:`AdapterConfig`)
    pytorch_lora_weights.safetensors  the student's LoRA in diffusers' peft layout: keys
                                      ``transformer.<module>.lora_{A,B}.weight``, rank/alpha/targets in
                                      the ``lora_adapter_metadata`` header, so any diffusers LoRA
                                      loader (``load_lora_weights``, ``load_lora_adapter``) reads it
    arcflow_heads.safetensors         the student's output layers, which replace the teacher's:
                                      ``norm_out.*`` (its own final AdaLN) and ``heads.*`` (means,
                                      logits and rates of the K modes, :class:`ArcFlowHeads`)

The LoRA sits apart from the heads because it is an ordinary diffusers LoRA (it can be
weighted against style LoRAs with ``set_adapters``), while the heads change what the
transformer outputs and need the ArcFlow sampler.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import typing
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from arcflow.backbones.flux import ArcFlowHeads

CONFIG_FILE = "arcflow_config.json"
LORA_FILE = "pytorch_lora_weights.safetensors"
HEADS_FILE = "arcflow_heads.safetensors"
FORMAT = "arcflow-flux-adapter"
FORMAT_VERSION = 1
DTYPES = ("float16", "bfloat16", "float32")


@dataclass(frozen=True)
class AdapterConfig:
    """Everything besides the weights that sampling the exported student needs."""

    base_model: str
    """Hub id or folder of the teacher the student was distilled from."""
    num_modes: int
    shift: float
    """Fixed sigma shift of the raw-time schedule (no resolution-dependent shift)."""
    nfe: int
    """Recommended number of student evaluations (the distilled one)."""
    timestep_ratio: float
    total_substeps: int
    guidance: float
    """Guidance embedding both teacher and student were run with."""
    lora_rank: int
    lora_alpha: float
    lora_dropout: float
    """As trained; the exported LoRA itself has dropout 0 (it is for inference)."""
    dtype: str
    """dtype of the exported tensors."""
    iteration: int
    """Training iteration of the exported EMA weights."""
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        checks = {
            "num_modes": self.num_modes >= 1, "shift": self.shift > 0, "nfe": self.nfe >= 2,
            "timestep_ratio": self.timestep_ratio > 0, "total_substeps": self.total_substeps >= 1,
            "lora_rank": self.lora_rank >= 1, "lora_alpha": self.lora_alpha > 0,
            "dtype": self.dtype in DTYPES, "format": self.format == FORMAT,
            "format_version": self.format_version == FORMAT_VERSION,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid adapter config value(s): {', '.join(f'{n}={getattr(self, n)!r}' for n in bad)}")

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> "AdapterConfig":
        """Parse and validate ``arcflow_config.json``; every problem names the file and the key."""
        path = Path(path)
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"cannot read ArcFlow adapter config '{path}': {err}") from None
        if not isinstance(values, dict):
            raise ValueError(f"'{path}' must hold a JSON object, got {type(values).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        unknown = sorted(set(values) - set(fields))
        missing = sorted(n for n, f in fields.items() if f.default is dataclasses.MISSING and n not in values)
        if unknown or missing:
            raise ValueError(f"'{path}': missing keys {missing}, unknown keys {unknown}")
        for name, value in values.items():
            expected = hints[name]
            ok = (isinstance(value, (int, float)) and not isinstance(value, bool)) if expected is float else (
                isinstance(value, expected) and not (expected is int and isinstance(value, bool)))
            if not ok:
                raise ValueError(f"'{path}': key '{name}' must be {expected.__name__}, got {value!r}")
        try:
            return cls(**{k: float(v) if hints[k] is float else v for k, v in values.items()})
        except ValueError as err:
            raise ValueError(f"'{path}': {err}") from None


def lora_metadata(rank: int, alpha: float, target_modules: list[str]) -> dict[str, object]:
    """peft ``LoraConfig`` kwargs as diffusers stores them in the LoRA file header (``transformer.``-prefixed)."""
    config = {"r": rank, "lora_alpha": alpha, "lora_dropout": 0.0, "target_modules": sorted(target_modules)}
    return {f"transformer.{key}": value for key, value in config.items()}


def student_output_layers(transformer: nn.Module, num_modes: int) -> nn.ModuleDict:
    """Fresh student ``norm_out`` + heads shaped for ``transformer`` (keys as in the heads file).

    Their values are meant to be overwritten by loaded tensors; the heads are built on CPU
    around a stand-in of the teacher's ``proj_out`` (which may live on meta or an accelerator)
    and without touching the global RNG, so loading an adapter never changes later samples.
    """
    teacher_proj_out = transformer.proj_out
    with torch.random.fork_rng(devices=[]):
        stand_in = nn.Linear(teacher_proj_out.in_features, teacher_proj_out.out_features)
        heads = ArcFlowHeads(stand_in, num_modes)
    return nn.ModuleDict({"norm_out": copy.deepcopy(transformer.norm_out), "heads": heads})


def check_shapes(found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], where: str) -> None:
    """Same keys and shapes, or a ValueError naming ``where`` and the first offending keys."""
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{where}: missing {len(missing)} tensor(s) {missing[:4]}, "
                         f"unexpected {len(unexpected)} {unexpected[:4]}")
    for key, shape in expected.items():
        if tuple(found[key]) != tuple(shape):
            raise ValueError(f"{where}: '{key}' has shape {tuple(found[key])}, expected {tuple(shape)}")
