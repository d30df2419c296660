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

import dataclasses
import json
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import hf_hub_download
from safetensors import safe_open
from safetensors.torch import load_file

from arcflow.models.base import ADAPTER_NAME, OutputSwitch, student_output_layers

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
    family: str = "flux"
    """The model family (``model.backbone``) of the base model: which pipeline samples it."""
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


def check_shapes(found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], where: str) -> None:
    """Same keys and shapes, or a ValueError naming ``where`` and the first offending keys."""
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{where}: missing {len(missing)} tensor(s) {missing[:4]}, "
                         f"unexpected {len(unexpected)} {unexpected[:4]}")
    for key, shape in expected.items():
        if tuple(found[key]) != tuple(shape):
            raise ValueError(f"{where}: '{key}' has shape {tuple(found[key])}, expected {tuple(shape)}")


def adapter_file(path_or_hub_id: str | Path, filename: str, subfolder: str | None = None) -> Path:
    """One file of an adapter folder, local or on the Hugging Face Hub."""
    local = Path(path_or_hub_id, subfolder or "")
    if local.is_dir():
        if not (local / filename).is_file():
            raise FileNotFoundError(f"ArcFlow adapter folder '{local}' has no {filename}")
        return local / filename
    if Path(path_or_hub_id).exists():
        raise NotADirectoryError(f"ArcFlow adapter '{path_or_hub_id}' must be a folder (made by `arcflow export`)")
    try:
        return Path(hf_hub_download(str(path_or_hub_id), filename, subfolder=subfolder))
    except (OSError, ValueError) as err:  # hub errors are OSErrors; a malformed repo id a ValueError
        raise FileNotFoundError(f"cannot find {filename} of ArcFlow adapter '{path_or_hub_id}' "
                                f"(no such folder, and the hub says: {err})") from None


def _check_lora_rank(path: Path, rank: int) -> None:
    """The LoRA file must agree with the adapter config (read from the header, not the tensors)."""
    with safe_open(str(path), framework="pt") as f:
        ranks = {f.get_slice(key).get_shape()[0] for key in f.keys() if ".lora_A." in key}
    if ranks != {rank}:
        raise ValueError(f"'{path}' has LoRA rank {sorted(ranks)}, but {CONFIG_FILE} says lora_rank={rank}")


class ArcFlowAdapterMixin:
    """``load_arcflow_adapter``/``unload_arcflow_adapter`` for a diffusers pipeline whose transformer ends in
    ``norm_out`` -> ``proj_out`` (every family we distil); the family's pipeline adds ``__call__``.

    The student is made in place on the pipeline's own transformer: its LoRA is loaded by
    diffusers under the adapter name ``"arcflow"`` (so ``set_adapters`` can mix it with style
    LoRAs), and the teacher's ``norm_out``/``proj_out`` are put behind the same switch the
    trainer uses, next to the student's norm_out and ArcFlow heads. No second copy of the
    teacher exists, and ``unload_arcflow_adapter`` gives it back weight for weight.
    """

    arcflow_config: AdapterConfig | None = None
    """The loaded adapter's settings; None while the transformer is the plain teacher."""

    def load_arcflow_adapter(self, path_or_hub_id: str | Path, subfolder: str | None = None) -> AdapterConfig:
        """Turn the transformer into the student in place, from an ``arcflow export`` folder or hub repo."""
        if self.arcflow_config is not None:
            raise ValueError("an ArcFlow adapter is already loaded; call unload_arcflow_adapter() first")
        config = AdapterConfig.load(adapter_file(path_or_hub_id, CONFIG_FILE, subfolder))
        heads_path = adapter_file(path_or_hub_id, HEADS_FILE, subfolder)
        lora_path = adapter_file(path_or_hub_id, LORA_FILE, subfolder)
        _check_lora_rank(lora_path, config.lora_rank)
        transformer = self.transformer
        layers = student_output_layers(transformer, config.num_modes)
        tensors = load_file(heads_path)
        check_shapes({k: tuple(v.shape) for k, v in tensors.items()},
                     {k: tuple(v.shape) for k, v in layers.state_dict().items()},
                     f"'{heads_path}' (K={config.num_modes}, base '{config.base_model}') does not fit this transformer")
        layers.load_state_dict(tensors)
        teacher_weight = transformer.proj_out.weight
        layers.to(device=teacher_weight.device, dtype=teacher_weight.dtype)

        # The transformer's own loader (not load_lora_weights): the file holds no text-encoder LoRA.
        transformer.load_lora_adapter(str(lora_path), prefix="transformer", adapter_name=ADAPTER_NAME,
                                      use_safetensors=True, low_cpu_mem_usage=True, _pipeline=self)
        for name, student in (("norm_out", layers["norm_out"]), ("proj_out", layers["heads"])):
            switch = OutputSwitch(getattr(transformer, name), student)
            switch.use_student = True
            setattr(transformer, name, switch)
        self.arcflow_config = config
        return config

    def unload_arcflow_adapter(self) -> None:
        """Give back the plain teacher: original output layers, the "arcflow" LoRA removed."""
        if self.arcflow_config is None:
            raise ValueError("no ArcFlow adapter is loaded")
        transformer = self.transformer
        transformer.norm_out = transformer.norm_out.teacher
        transformer.proj_out = transformer.proj_out.teacher
        transformer.delete_adapters(ADAPTER_NAME)
        if not getattr(transformer, "peft_config", None):
            transformer.unload_lora()  # no other LoRA left: drop peft's wrappers too, restoring the module tree
        self.arcflow_config = None

    def save_pretrained(self, *args: Any, **kwargs: Any) -> None:
        """Refused while an adapter is loaded: the transformer then holds the student's extra layers."""
        if self.arcflow_config is not None:
            raise ValueError("call unload_arcflow_adapter() before save_pretrained(); the student is shipped as "
                             "its adapter folder (arcflow export), not as a saved pipeline")
        super().save_pretrained(*args, **kwargs)
