"""Run configuration: OpenMMLab-style Python files (``_base_`` inheritance) read by mmengine,
then checked against typed dataclasses so that a misspelt key fails at start-up, naming the
key and the nearest valid one, instead of being silently ignored.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from mmengine.config import Config


@dataclass
class TextEncoderConfig:
    """Embed prompts on the fly (no cache). ``pretrained`` defaults to the model's."""

    type: str | None = None
    """A text-encoder class of the model's family (``arcflow.models``); None: the family's default."""
    pretrained: str | None = None
    max_sequence_length: int = 512
    dtype: str | None = None


@dataclass
class ModelConfig:
    backbone: str = "flux"
    pretrained: str = "black-forest-labs/FLUX.1-dev"
    """Hub id or local diffusers folder: the only difference between a tiny and a real run."""
    num_modes: int = 16
    lora_rank: int = 256
    lora_alpha: float = 256.0
    lora_dropout: float = 0.05
    guidance: float = 3.5
    cfg_renorm: bool = False
    """True-CFG families (Qwen-Image): rescale the guided velocity to the conditional one's norm per token, as
    QwenImagePipeline does; off by default (SPEC §8). Guidance-embedding families (FLUX) ignore it."""
    dtype: str = "bfloat16"
    """dtype of the frozen weights and of compute; trainable parameters stay float32."""
    gradient_checkpointing: bool = False
    text_encoder: TextEncoderConfig | None = None

    def __post_init__(self) -> None:
        if self.num_modes < 1:
            raise _error("model.num_modes", f"must be >= 1 (K Gaussian modes per patch), got {self.num_modes}")
        if self.lora_rank < 0:
            raise _error("model.lora_rank", f"must be >= 0, got {self.lora_rank}")
        if not 0 <= self.lora_dropout < 1:
            raise _error("model.lora_dropout", f"must be in [0, 1), got {self.lora_dropout}")


@dataclass
class DistillConfig:
    """SPEC §3-§4: the n-NFE schedule and the imitation rollout."""

    nfe: int = 2
    timestep_ratio: float = 1.0
    shift: float = 3.2
    teacher_ratio_decay_iters: int = 2000
    num_states: int = 4
    window_substeps: int = 3
    total_substeps: int = 128
    dropout: float = 0.1
    loss_scale: float = 30.0

    def __post_init__(self) -> None:
        if self.nfe < 2:  # SPEC §3: export, generate and the pipelines refuse fewer, so training does too
            raise _error("distill.nfe", f"must be >= 2 student steps, got {self.nfe}")


@dataclass
class OptimizerConfig:
    type: str = "AdamW"
    """"AdamW" (torch) or "AdamW8bit" (bitsandbytes; CUDA only, falls back to AdamW on CPU)."""
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    rates_lr_mult: float = 0.1
    warmup_iters: int = 100
    warmup_start_factor: float = 0.001
    grad_clip: float = 50.0
    grad_clip_start_iter: int = 100


@dataclass
class EMAConfig:
    gamma: float = 7.0
    """beta(n) = (1 - 1/n)^(gamma + 1) after n updates."""
    start_iter: int = 100


@dataclass
class TrainConfig:
    batch_size: int = 4
    """Prompts per process per iteration; the run depends on the global batch (world size x this)."""
    grad_accum_batch_size: int | None = None
    """Process the batch in micro-batches of this size: same gradient, less memory."""
    seed: int = 42
    parallel: str = "ddp"
    """"ddp": replicate, all-reduce trainable gradients; "fsdp": FSDP2-shard everything per block."""
    skip_non_finite_steps: int = 0
    """Steps with a non-finite loss or gradient norm to skip (logged) before stopping; 0: stop at the first."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise _error("train_cfg.batch_size", f"must be >= 1, got {self.batch_size}")
        if self.grad_accum_batch_size is not None and self.grad_accum_batch_size < 1:
            raise _error("train_cfg.grad_accum_batch_size", f"must be >= 1 or None, got {self.grad_accum_batch_size}")
        if self.parallel not in ("ddp", "fsdp"):
            raise _error("train_cfg.parallel", f"must be 'ddp' or 'fsdp', got {self.parallel!r}")
        if self.skip_non_finite_steps < 0:
            raise _error("train_cfg.skip_non_finite_steps", f"must be >= 0, got {self.skip_non_finite_steps}")


@dataclass
class PromptsConfig:
    """One split of the prompt set: a row range of its source, and how its prompts make batches."""

    source: str = ""
    """Hub dataset id (``datasets.load_dataset``) or a local file/folder (txt, jsonl, parquet, csv);
    empty: ``data.source``."""
    prompt_file: str = ""
    """Older name of ``source`` (a local file), still read so existing configs keep working."""
    split: str = "train"
    """The ``datasets`` split to read (local files have only 'train')."""
    start_ind: int = 0
    end_ind: int | None = None
    """Rows [start_ind, end_ind) of the source, Python-style: start_ind=-128 is the last 128."""
    max_size: int | None = None
    """Only the first max_size valid prompts of the range (the cache tool's --max-size)."""
    repeat: int = 1
    """Each prompt this many times (validation: several fixed noises per prompt)."""
    height: int = 1024
    width: int = 1024
    """Image size of prompts without height/width columns, and of every prompt when bucketize is off."""
    bucketize: bool = True
    """Each prompt's own height/width picks its latent shape (aspect-ratio buckets)."""
    skip_invalid: bool = False
    """Skip rows with an empty prompt or a bad size (counted and logged) instead of stopping."""


CACHE_MODES = ("auto", "always", "never")


@dataclass
class DataConfig:
    """Prompt sets and where their embedding cache lives (see arcflow.data.batches for the cache rule)."""

    source: str = ""
    """Default prompt set of both splits: hub dataset id or local file/folder."""
    data_root: str = ""
    """Cache written by tools/cache_image_prompt_data.py ({data_root}/train, {data_root}/val)."""
    cache: str = "auto"
    """'auto': the cache when complete, else embed on the fly with model.text_encoder;
    'always': the cache or an error; 'never': always embed on the fly."""
    shard_size: int = 2048
    """Prompts per cache shard file."""
    cache_storage: str = "bf16"
    """How the cache stores text rows: 'bf16', or 'fp8' (e4m3, a power-of-two scale per token: half the bytes)."""
    train: PromptsConfig = field(default_factory=PromptsConfig)
    val: PromptsConfig = field(default_factory=PromptsConfig)

    def __post_init__(self) -> None:
        if self.cache not in CACHE_MODES:
            raise _error("data.cache", f"must be one of {', '.join(CACHE_MODES)}, got {self.cache!r}")
        if self.cache_storage not in ("bf16", "fp8"):
            raise _error("data.cache_storage", f"must be 'bf16' or 'fp8', got {self.cache_storage!r}")
        if self.shard_size < 1:
            raise _error("data.shard_size", f"must be >= 1, got {self.shard_size}")
        for name in ("train", "val"):
            split: PromptsConfig = getattr(self, name)
            if split.source and split.prompt_file and split.source != split.prompt_file:
                raise _error(f"data.{name}.prompt_file", f"{split.prompt_file!r} contradicts data.{name}.source "
                             f"{split.source!r}; set only source")
            split.source = split.source or split.prompt_file or self.source
            for key in ("height", "width"):
                value = getattr(split, key)
                if value <= 0 or value % 16:
                    raise _error(f"data.{name}.{key}", f"must be a positive multiple of 16, got {value}")
            if split.repeat < 1:
                raise _error(f"data.{name}.repeat", f"must be >= 1, got {split.repeat}")
            if split.max_size is not None and split.max_size < 1:
                raise _error(f"data.{name}.max_size", f"must be >= 1 or None, got {split.max_size}")


METRIC_GROUPS = ("alignment", "fid", "clip", "lpips", "hpsv2", "image_reward")
"""Metric groups of arcflow.evaluation (alignment: latent MSE and PSNR; fid: FID-T, pFID-T, FID-real)."""


@dataclass
class ValConfig:
    num_prompts: int = 8
    batch_size: int = 4
    teacher_steps: int = 128
    nfe: tuple[int, ...] = (2,)
    seed: int = 0
    """Fixed validation noise, so images are comparable across iterations and runs."""
    metrics: tuple[str, ...] = ()
    """Evaluation metrics (``eval_cfg`` names, e.g. ``('fid', 'clip', 'lpips')``) of the student against the
    teacher's ``teacher_steps`` samples, on the first ``metrics_num_prompts`` validation prompts; the
    settings of each metric (weights, CLIP model) are ``eval_cfg``'s."""
    metrics_num_prompts: int = 8

    def __post_init__(self) -> None:
        unknown = sorted(set(self.metrics) - set(METRIC_GROUPS))
        if unknown:
            raise _error("val_cfg.metrics", f"unknown {unknown}; expected some of {', '.join(METRIC_GROUPS)}")


@dataclass
class EvalConfig:
    """``arcflow eval`` / ``tools/test.py``: the field's evaluation protocol (arcflow.evaluation)."""

    prompts: str = "Lakonik/t2i-prompts-hpsv2"
    """Hub dataset id or local file/folder (as ``data.source``); the HPSv2 set has 3,200 prompts."""
    split: str = "train"
    num_prompts: int | None = None
    """The first N prompts of the set (None: all)."""
    height: int = 1024
    width: int = 1024
    """Image size of prompts without height/width columns."""
    seed: int = 0
    """Noise seed: each prompt's noise is a function of (seed, prompt, size, occurrence), whatever the ranks."""
    nfe: int | None = None
    """Student evaluations per image (None: ``distill.nfe``)."""
    teacher_steps: int | None = None
    """Steps of the teacher's reference sampler (None: the family's, 50 for FLUX and Qwen-Image)."""
    batch_size: int = 4
    """Images generated per forward."""
    feature_batch_size: int = 32
    """Images per forward of the metric networks."""
    teacher_store: str = "data/eval_teacher"
    """Teacher images are made once per (model, sampler, size, noise seed) and reused from here."""
    metrics: tuple[str, ...] = METRIC_GROUPS
    """Which metric groups to compute; one that cannot be (no library, no weights) is reported unavailable."""
    inception_weights: str = ""
    """FID Inception (torch-fidelity's pt_inception-2015-12-05) file; empty: torch's hub cache."""
    fid_features: int = 2048
    """Inception features of FID: 2048 (pool3, the standard), or 64, 192, 768 (torch-fidelity's earlier layers)."""
    patch_size: int = 299
    """Side of the native-resolution centre crop of patch-FID."""
    real_images: str = ""
    """Real images for fid_real: a folder of images, or an .npz of Inception statistics (mu, sigma)."""
    clip_model: str = "ViT-L-14"
    """open_clip model name, or a JSON model config file."""
    clip_pretrained: str = "openai"
    """open_clip pretrained tag, or a local weights file."""
    lpips_net: str = "alex"
    download_weights: bool = False
    """Let the metric libraries download missing weights (off: only weights already on this machine count)."""
    hooks: tuple[str, ...] = ()
    """Extra per-image metrics, ``'module:function'`` (see arcflow.metrics.suite.HookMetric)."""
    grid_prompts: int = 8

    def __post_init__(self) -> None:
        unknown = sorted(set(self.metrics) - set(METRIC_GROUPS))
        if unknown:
            raise _error("eval_cfg.metrics", f"unknown {unknown}; expected some of {', '.join(METRIC_GROUPS)}")
        for key in ("batch_size", "feature_batch_size", "patch_size"):
            if getattr(self, key) < 1:
                raise _error(f"eval_cfg.{key}", f"must be >= 1, got {getattr(self, key)}")
        for key in ("height", "width"):
            if getattr(self, key) <= 0 or getattr(self, key) % 16:
                raise _error(f"eval_cfg.{key}", f"must be a positive multiple of 16, got {getattr(self, key)}")
        if self.fid_features not in (64, 192, 768, 2048):
            raise _error("eval_cfg.fid_features", f"must be one of 64, 192, 768, 2048, got {self.fid_features!r}")
        if self.num_prompts is not None and self.num_prompts < 1:
            raise _error("eval_cfg.num_prompts", f"must be >= 1 or None, got {self.num_prompts}")
        for hook in self.hooks:
            if hook.count(":") != 1:
                raise _error("eval_cfg.hooks", f"{hook!r} must be 'module:function'")


@dataclass
class CheckpointConfig:
    keep_last: int = 1
    keep_every: int | None = 1000
    """Also keep every checkpoint whose iteration is a multiple of this."""


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    train_cfg: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    val_cfg: ValConfig = field(default_factory=ValConfig)
    eval_cfg: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    name: str = ""
    work_dir: str = ""
    """Logs, metrics, TensorBoard and samples; empty means work_dirs/{name}."""
    checkpoint_dir: str = ""
    """Empty means checkpoints/{name}, or {work_dir}/checkpoints when --work-dir is given."""
    total_iters: int = 10000
    save_interval: int = 500
    eval_interval: int = 500
    log_interval: int = 1

    def __post_init__(self) -> None:
        for key in ("total_iters", "eval_interval"):
            if getattr(self, key) < 0:
                raise _error(key, f"must be >= 0, got {getattr(self, key)}")
        for key in ("save_interval", "log_interval"):
            if getattr(self, key) < 1:
                raise _error(key, f"must be >= 1, got {getattr(self, key)}")


class ConfigError(ValueError):
    """A config file or value the run cannot use; the message names the file or key."""


def _error(path: str, message: str) -> ConfigError:
    return ConfigError(f"config key '{path}': {message}")


def _build(tp: Any, value: Any, path: str, source: str) -> Any:
    """Convert a plain config value to type ``tp``, naming the key on any mismatch."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        inner = [t for t in options if t is not type(None)]
        return _build(inner[0], value, path, source)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _error(path, f"expected a dict, got {value!r} ({source})")
        return _from_dict(tp, value, path, source)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _error(path, f"expected a list or tuple, got {value!r} ({source})")
        args = typing.get_args(tp)
        item_types = [args[0]] * len(value) if args[-1] is Ellipsis else list(args)
        if len(item_types) != len(value):
            raise _error(path, f"expected {len(item_types)} values, got {value!r} ({source})")
        return tuple(_build(t, v, f"{path}[{i}]", source) for i, (t, v) in enumerate(zip(item_types, value)))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        raise _error(path, f"expected {tp.__name__}, got {value!r} ({source})")
    return value


def _from_dict(cls: type, values: dict, prefix: str, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        path = f"{prefix}.{key}" if prefix else key
        if key not in hints:
            close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
            hint = f"; did you mean '{(prefix + '.') if prefix else ''}{close[0]}'?" if close else ""
            raise ConfigError(f"unknown config key '{path}' in {source}{hint} (valid keys here: {', '.join(names)})")
        kwargs[key] = _build(hints[key], value, path, source)
    return cls(**kwargs)


def load_config(path: str | os.PathLike, options: dict[str, Any] | None = None) -> RunConfig:
    """Read a config file, apply ``--cfg-options`` overrides, and validate every key."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        cfg = Config.fromfile(str(path))
    except SyntaxError as err:  # mmengine names neither the file nor which of the _base_ chain it is
        file, line, what = _syntax_error(path) or (path, err.lineno, err.msg)
        raise ConfigError(f"config file '{file}' line {line}: syntax error: {what}") from None
    if options:
        cfg.merge_from_dict(options)
    values = {k: v for k, v in cfg.to_dict().items() if not k.startswith("_")}
    values.setdefault("name", path.stem)
    return _from_dict(RunConfig, values, "", str(path))


def _syntax_error(path: Path, seen: frozenset[Path] = frozenset()) -> tuple[Path, int | None, str] | None:
    """The first file of ``path`` and its ``_base_`` chain that does not parse: (file, line, message)."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except SyntaxError as err:
        return path, err.lineno, err.msg
    except (OSError, ValueError):
        return None
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_base_" for t in node.targets):
            try:
                bases = ast.literal_eval(node.value)
            except ValueError:
                return None
            for base in [bases] if isinstance(bases, str) else bases:
                base_path = (path.parent / base).resolve()
                if base_path not in seen and (found := _syntax_error(base_path, seen | {path.resolve()})):
                    return found
    return None


def torch_dtype(name: str) -> torch.dtype:
    """A dtype named in the config ('bfloat16', 'float32', ...)."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"config dtype {name!r} is not a torch dtype (e.g. 'bfloat16', 'float32')")
    return dtype


def resolve_dirs(cfg: RunConfig, work_dir: str | None) -> RunConfig:
    """Apply the default layout: ``--work-dir`` holds everything of the run."""
    if work_dir:
        return dataclasses.replace(cfg, work_dir=work_dir, checkpoint_dir=str(Path(work_dir) / "checkpoints"))
    return dataclasses.replace(
        cfg,
        work_dir=cfg.work_dir or str(Path("work_dirs") / cfg.name),
        checkpoint_dir=cfg.checkpoint_dir or str(Path("checkpoints") / cfg.name),
    )
