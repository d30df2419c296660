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
import types
import typing
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from huggingface_hub import hf_hub_download
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import Tensor, nn

from arcflow.checksums import read_checksums, verify_file
from arcflow.method.schedule import full_batch, segment_bounds, shifted_sigma
from arcflow.models.base import ADAPTER_NAME, OutputSwitch, pack, policy_from_tokens, student_output_layers, unpack

CONFIG_FILE = "arcflow_config.json"
LORA_FILE = "pytorch_lora_weights.safetensors"
HEADS_FILE = "arcflow_heads.safetensors"
FORMAT = "arcflow-adapter"
READABLE_FORMATS = (FORMAT, "arcflow-flux-adapter")
"""What adapters of every family were written as before the name stopped saying FLUX still loads."""
FORMAT_VERSION = 2
"""2 records what the student was trained with (text length, resolutions); 1 did not and still loads."""
READABLE_VERSIONS = (1, 2)
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
    max_sequence_length: int | None = None
    """Text tokens per prompt the student was trained with (FLUX: T5's padded length); None in format 1."""
    resolutions: tuple[tuple[int, int], ...] = ()
    """(height, width) of the training images, most frequent first (the pipeline's default size)."""
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        recorded = self.format_version < 2 or (
            self.max_sequence_length is not None and self.max_sequence_length >= 1 and len(self.resolutions) > 0)
        checks = {
            "num_modes": self.num_modes >= 1, "shift": self.shift > 0, "nfe": self.nfe >= 2,
            "timestep_ratio": self.timestep_ratio > 0, "total_substeps": self.total_substeps >= 1,
            "lora_rank": self.lora_rank >= 1, "lora_alpha": self.lora_alpha > 0,
            "dtype": self.dtype in DTYPES, "format": self.format in READABLE_FORMATS,
            "format_version": self.format_version in READABLE_VERSIONS,
            "max_sequence_length": recorded,
            "resolutions": recorded and all(h > 0 and w > 0 for h, w in self.resolutions),
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
        kwargs = {}
        for name, value in values.items():
            kwargs[name] = _json_value(hints[name], value, f"'{path}': key '{name}'")
        try:
            return cls(**kwargs)
        except ValueError as err:
            raise ValueError(f"'{path}': {err}") from None

    @property
    def default_size(self) -> tuple[int, int] | None:
        """(height, width) the student saw most in training; None when the folder does not say."""
        return self.resolutions[0] if self.resolutions else None

    def untrained(self, **request: Any) -> dict[str, str]:
        """Which requested settings leave what the student was trained with (see :func:`settings_outside`)."""
        trained = {"max_sequence_length": self.max_sequence_length, "nfe": self.nfe,
                   "timestep_ratio": self.timestep_ratio, "guidance": self.guidance}
        return settings_outside(trained, self.resolutions, **request)


def settings_outside(trained: dict[str, Any], resolutions: Sequence[Sequence[int]], **request: Any) -> dict[str, str]:
    """{setting: why} for each requested setting that differs from ``trained`` (or, for ``size``, a
    (height, width) pair, is not among ``resolutions``). A None request, or a None trained value (a
    folder that does not record it), is never outside."""
    outside = {}
    for key, value in request.items():
        if value is None:
            continue
        if key == "size":
            sizes = [tuple(size) for size in resolutions]
            if sizes and tuple(value) not in sizes:
                seen = ", ".join(f"{h}x{w}" for h, w in sizes[:8]) + (" ..." if len(sizes) > 8 else "")
                outside[key] = f"{value[0]}x{value[1]} is not a size it was trained on ({seen})"
        elif trained.get(key) is not None and value != trained[key]:
            outside[key] = f"{key}={value} differs from the trained {key}={trained[key]}"
    return outside


def _json_value(expected: Any, value: Any, where: str) -> Any:
    """``value`` read from JSON as the field type ``expected`` (float accepts ints), or a ValueError naming it."""
    if typing.get_origin(expected) in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(expected):
            return None
        expected = next(t for t in typing.get_args(expected) if t is not type(None))
    if expected == tuple[tuple[int, int], ...]:
        pairs = value if isinstance(value, list) else None
        if pairs is None or not all(isinstance(p, list) and len(p) == 2 and all(
                isinstance(v, int) and not isinstance(v, bool) for v in p) for p in pairs):
            raise ValueError(f"{where} must be a list of [height, width] integer pairs, got {value!r}")
        return tuple((h, w) for h, w in pairs)
    if expected is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(value, expected) and not (expected is int and isinstance(value, bool)):
        return value
    raise ValueError(f"{where} must be {expected.__name__}, got {value!r}")


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
        # Tensor files only: the JSON config may be edited by hand and is checked key by key when loaded.
        recorded = read_checksums(local) if filename.endswith(".safetensors") else None
        if recorded is not None:  # None too for a folder exported by an older arcflow
            verify_file(local, filename, recorded, "ArcFlow adapter")
        return local / filename
    if Path(path_or_hub_id).exists():
        raise NotADirectoryError(f"ArcFlow adapter '{path_or_hub_id}' must be a folder (made by `arcflow export`)")
    try:
        return Path(hf_hub_download(str(path_or_hub_id), filename, subfolder=subfolder))
    except (OSError, ValueError) as err:  # hub errors are OSErrors; a malformed repo id a ValueError
        raise FileNotFoundError(f"cannot find {filename} of ArcFlow adapter '{path_or_hub_id}' "
                                f"(no such folder, and the hub says: {err})") from None


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """All tensors of an adapter's safetensors file; a truncated or damaged one is named."""
    try:
        return load_file(path)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"'{path}' is not a readable safetensors file (truncated or damaged?): {err}") from None


def _check_lora_rank(path: Path, rank: int) -> None:
    """The LoRA file must agree with the adapter config (read from the header, not the tensors)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            ranks = {f.get_slice(key).get_shape()[0] for key in f.keys() if ".lora_A." in key}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"'{path}' is not a readable safetensors file (truncated or damaged?): {err}") from None
    if ranks != {rank}:
        raise ValueError(f"'{path}' has LoRA rank {sorted(ranks)}, but {CONFIG_FILE} says lora_rank={rank}")


def _fuse_lora(transformer: nn.Module) -> list[tuple[nn.Module, Tensor]]:
    """Merge the "arcflow" LoRA into its base layers' weights (float32 sum) and drop it from peft.

    Returns each changed base layer with a CPU copy of its original weight, so the merge can be
    undone exactly (subtracting the delta again would not give back bf16 weights bit for bit).
    """
    kept = []
    for module in transformer.modules():
        if isinstance(module, BaseTunerLayer) and ADAPTER_NAME in getattr(module, "lora_A", {}):
            base = module.get_base_layer()
            weight = base.weight
            kept.append((base, weight.detach().to("cpu", copy=True)))
            delta = module.lora_B[ADAPTER_NAME].weight.float() @ module.lora_A[ADAPTER_NAME].weight.float()
            weight.data.copy_(weight.float() + delta.to(weight.device) * module.scaling[ADAPTER_NAME])
    transformer.delete_adapters(ADAPTER_NAME)
    if not getattr(transformer, "peft_config", None):
        transformer.unload_lora()  # no LoRA left: peft's wrappers go too, so a call runs plain Linear layers
    return kept


class ArcFlowAdapterMixin:
    """``load_arcflow_adapter``/``unload_arcflow_adapter`` for a diffusers pipeline whose transformer ends in
    ``norm_out`` -> ``proj_out`` (every family we distil); the family's pipeline adds ``__call__``.

    The student is made in place on the pipeline's own transformer: its LoRA is loaded by
    diffusers under the adapter name ``"arcflow"``, and the teacher's ``norm_out``/``proj_out`` are
    put behind the same switch the trainer uses, next to the student's norm_out and ArcFlow heads.
    When it is the only LoRA, it is fused into the base weights (no LoRA branch runs per call); left
    unfused, ``set_adapters`` can weight it against style LoRAs. No second copy of the teacher is
    on the accelerator, and ``unload_arcflow_adapter`` gives it back weight for weight.
    """

    arcflow_config: AdapterConfig | None = None
    """The loaded adapter's settings; None while the transformer is the plain teacher."""
    _arcflow_warned: frozenset[str] = frozenset()
    """Settings already warned about for the loaded adapter (each warns once)."""
    _arcflow_unfused: list[tuple[nn.Module, Tensor]] | None = None
    """While the LoRA is fused: each merged base layer and its original weight (on the CPU)."""

    @property
    def arcflow_fused(self) -> bool:
        """Whether the loaded ArcFlow LoRA is merged into the base weights."""
        return self._arcflow_unfused is not None

    def load_arcflow_adapter(self, path_or_hub_id: str | Path, subfolder: str | None = None,
                             fuse: bool | None = None) -> AdapterConfig:
        """Turn the transformer into the student in place, from an ``arcflow export`` folder or hub repo.

        ``fuse`` (default: when no other LoRA is loaded) merges the LoRA into the weights it adapts:
        each call is then the plain transformer's cost. The original weights of those layers are kept
        in CPU memory for :meth:`unload_arcflow_adapter`. A LoRA loaded afterwards applies on top of
        the fused student; ``fuse=False`` keeps it a diffusers adapter named "arcflow" instead.
        """
        if self.arcflow_config is not None:
            raise ValueError("an ArcFlow adapter is already loaded; call unload_arcflow_adapter() first")
        transformer = self.transformer
        others = sorted(getattr(transformer, "peft_config", None) or {})
        if fuse and others:
            raise ValueError(f"fuse=True needs the ArcFlow LoRA to be the only one, but {others} are loaded; "
                             "load it with fuse=False to mix them with set_adapters")
        fuse = not others if fuse is None else fuse
        config = AdapterConfig.load(adapter_file(path_or_hub_id, CONFIG_FILE, subfolder))
        if config.format_version < 2:
            warnings.warn(f"ArcFlow adapter '{path_or_hub_id}' (format {config.format_version}) does not record the "
                          "text length and image sizes it was trained with, so calls default to the base pipeline's; "
                          "export it again (arcflow export) to record them", UserWarning, stacklevel=2)
        heads_path = adapter_file(path_or_hub_id, HEADS_FILE, subfolder)
        lora_path = adapter_file(path_or_hub_id, LORA_FILE, subfolder)
        _check_lora_rank(lora_path, config.lora_rank)
        layers = student_output_layers(transformer, config.num_modes)
        tensors = read_safetensors(heads_path)
        check_shapes({k: tuple(v.shape) for k, v in tensors.items()},
                     {k: tuple(v.shape) for k, v in layers.state_dict().items()},
                     f"'{heads_path}' (K={config.num_modes}, base '{config.base_model}') does not fit this transformer")
        layers.load_state_dict(tensors)
        teacher_weight = transformer.proj_out.weight
        layers.to(device=teacher_weight.device, dtype=teacher_weight.dtype)

        # The transformer's own loader (not load_lora_weights): the file holds no text-encoder LoRA.
        transformer.load_lora_adapter(str(lora_path), prefix="transformer", adapter_name=ADAPTER_NAME,
                                      use_safetensors=True, low_cpu_mem_usage=True, _pipeline=self)
        self._arcflow_unfused = _fuse_lora(transformer) if fuse else None
        for name, student in (("norm_out", layers["norm_out"]), ("proj_out", layers["heads"])):
            switch = OutputSwitch(getattr(transformer, name), student)
            switch.use_student = True
            setattr(transformer, name, switch)
        self.arcflow_config = config
        self._arcflow_warned = frozenset()
        return config

    def check_arcflow_active(self) -> None:
        """An unfused ArcFlow LoRA must be among the active adapters (diffusers activates only the newest)."""
        if self.arcflow_fused:
            return
        active = self.get_active_adapters()
        if ADAPTER_NAME not in active:
            raise ValueError(f"the '{ADAPTER_NAME}' LoRA is not active (active: {active}); "
                             f"include it, e.g. set_adapters(['{ADAPTER_NAME}', ...])")

    def warn_outside_training(self, **request: Any) -> None:
        """Warn once per setting when a call asks for what the student was not trained with
        (:meth:`AdapterConfig.untrained` names the settings)."""
        for key, why in self.arcflow_config.untrained(**request).items():
            if key not in self._arcflow_warned:
                self._arcflow_warned = self._arcflow_warned | {key}
                warnings.warn(f"ArcFlow adapter: {why}; expect worse images (this warning is shown once)",
                              UserWarning, stacklevel=4)

    def student_schedule(self, num_inference_steps: int | None, timestep_ratio: float | None, height: int | None,
                         width: int | None, max_sequence_length: int | None,
                         default_text_length: int) -> tuple[list[tuple[float, float]], int, int, int]:
        """The segments (raw-time bounds) of the student's evaluations, the image size and the text length
        of a call: every setting left out is the one the adapter records it was trained with."""
        config = self.arcflow_config
        num_steps = config.nfe if num_inference_steps is None else num_inference_steps
        if num_steps < 2:
            raise ValueError(f"num_inference_steps must be >= 2 for the ArcFlow student, got {num_steps}")
        bounds = segment_bounds(num_steps, config.timestep_ratio if timestep_ratio is None else timestep_ratio)
        default_height, default_width = config.default_size or (self.default_sample_size * self.vae_scale_factor,) * 2
        return (bounds, height or default_height, width or default_width,
                max_sequence_length or config.max_sequence_length or default_text_length)

    def run_student(self, latents: Tensor, bounds: list[tuple[float, float]], height: int, width: int,
                    prompt_embeds: Tensor, predict: Callable[[Tensor, Tensor, Tensor], Tensor],
                    callback_on_step_end: Callable[..., dict[str, Tensor]] | None,
                    tensor_inputs: list[str]) -> Tensor:
        """The student's evaluations on packed float32 ``latents`` (B, N, C): ``predict(latents, sigma,
        prompt_embeds)`` is the family's transformer call (its per-token output), whose policy is integrated exactly
        over each segment on the adapter's shift, the state staying float32 as in the trainer's sampler;
        ``callback_on_step_end`` is called as diffusers pipelines call it."""
        config = self.arcflow_config
        batch = latents.shape[0]
        latent_h = 2 * (int(height) // (self.vae_scale_factor * 2))
        latent_w = 2 * (int(width) // (self.vae_scale_factor * 2))
        self._num_timesteps = len(bounds)
        with self.progress_bar(total=len(bounds)) as progress_bar:
            for i, (tau_a, tau_b) in enumerate(bounds):
                if self.interrupt:
                    continue
                sigma_a = full_batch(shifted_sigma(tau_a, config.shift), batch, latents)
                sigma_b = full_batch(shifted_sigma(tau_b, config.shift), batch, latents)
                self._current_timestep = sigma_a[0] * 1000
                tokens = predict(latents, sigma_a, prompt_embeds)
                policy = policy_from_tokens(tokens.float(), config.num_modes, latent_h, latent_w, sigma_a)
                x = unpack(latents, latent_h, latent_w)[:, 0]
                latents = pack(policy.integrate(x, sigma_a, sigma_b))
                if callback_on_step_end is not None:
                    values = {"latents": latents, "prompt_embeds": prompt_embeds}
                    outputs = callback_on_step_end(self, i, self._current_timestep,
                                                   {k: values[k] for k in tensor_inputs})
                    latents = outputs.pop("latents", latents).float()
                    prompt_embeds = outputs.pop("prompt_embeds", prompt_embeds)
                progress_bar.update()
        self._current_timestep = None
        return latents

    def unload_arcflow_adapter(self) -> None:
        """Give back the plain teacher: original output layers, the "arcflow" LoRA removed."""
        if self.arcflow_config is None:
            raise ValueError("no ArcFlow adapter is loaded")
        transformer = self.transformer
        transformer.norm_out = transformer.norm_out.teacher
        transformer.proj_out = transformer.proj_out.teacher
        if self._arcflow_unfused is not None:
            for base, original in self._arcflow_unfused:
                base.weight.data.copy_(original)
            self._arcflow_unfused = None
        else:
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
