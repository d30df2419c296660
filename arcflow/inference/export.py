"""Export a training checkpoint's EMA student as a self-contained diffusers adapter folder.

    python tools/export_arcflow_to_diffusers.py CONFIG --ckpt CKPT --out-dir DIR [--dtype float32]
    arcflow export CONFIG --ckpt CKPT --out-dir DIR

The folder layout is described in :mod:`arcflow.models.adapter`. Before anything is
written, the checkpoint's EMA tensors are checked name by name and shape by shape against
the student the config describes (its base transformer's architecture, K, LoRA rank), so
a checkpoint of another run or a partial one fails here and not at sampling time.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
from safetensors.torch import save_file
from torch import Tensor, nn

from arcflow.checksums import write_checksums
from arcflow.config import RunConfig
from arcflow.models import Family, get_family
from arcflow.models.adapter import (CONFIG_FILE, DTYPES, HEADS_FILE, LORA_FILE, AdapterConfig, check_shapes,
                                    lora_metadata)
from arcflow.models.base import ADAPTER_NAME, PATCH, student_output_layers
from arcflow.training import checkpoint as ckpt

EMA_GROUP = "ema."
"""The trainer saves the EMA shadow under this group of its DCP checkpoint."""
# Where each group of the heads file lives among the backbone's trainable parameters.
_STUDENT_PREFIXES = {"norm_out": "transformer.norm_out.student.", "heads": "transformer.proj_out.student."}
_LORA_KEY = re.compile(rf"^transformer\.(.+)\.(lora_[AB])\.{ADAPTER_NAME}\.weight$")

_MODEL_CARD = """# ArcFlow {nfe}-NFE student of `{base}`

Exported from training iteration {iteration} (EMA weights). Load it on the base model:

```python
import torch
from arcflow.pipelines import {pipeline}

pipe = {pipeline}.from_pretrained("{base}", dtype=torch.bfloat16).to("cuda")
pipe.load_arcflow_adapter("path/to/this/folder")
image = pipe("a prompt", num_inference_steps={nfe}).images[0]
```

Files: `{lora}` (LoRA, diffusers/peft layout, adapter name "{adapter}"), `{heads}` (the student's
output heads and norm_out), `{config}` (K = {k} modes, shift {shift}, guidance {guidance}, and what it
was trained with: {text} text tokens, {sizes}; the pipeline defaults to these).
"""


def base_transformer_on_meta(pretrained: str, family: Family) -> nn.Module:
    """The base model's transformer architecture without weights: only its config.json is read."""
    transformer_class = family.backbone.transformer_class
    try:
        config = transformer_class.load_config(pretrained, subfolder="transformer")
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"cannot read the transformer config of model.pretrained='{pretrained}' "
                                f"(needed to check the checkpoint against it): {err}") from None
    with torch.device("meta"):
        return transformer_class.from_config(config)


def student_ema_shapes(transformer: nn.Module, num_modes: int, lora_rank: int,
                       lora_targets: str) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the trainable parameters a TransformerBackbone makes on ``transformer``."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name, module in transformer.named_modules():
        if re.fullmatch(lora_targets, name):  # peft's rule for a string target_modules
            shapes[f"transformer.{name}.lora_A.{ADAPTER_NAME}.weight"] = (lora_rank, module.in_features)
            shapes[f"transformer.{name}.lora_B.{ADAPTER_NAME}.weight"] = (module.out_features, lora_rank)
    for key, tensor in student_output_layers(transformer, num_modes).state_dict().items():
        group, rest = key.split(".", 1)
        shapes[_STUDENT_PREFIXES[group] + rest] = tuple(tensor.shape)
    return shapes


def _checkpoint_ema_shapes(path: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """(shape, dtype) of each EMA tensor in the DCP index, unpickled with the checkpoint's allow-list."""
    metadata = ckpt.read_metadata(path).state_dict_metadata
    found = {key[len(EMA_GROUP):]: (tuple(item.size), item.properties.dtype) for key, item in metadata.items()
             if key.startswith(EMA_GROUP)}
    if not found:
        groups = sorted({key.split(".", 1)[0] for key in metadata})
        raise ValueError(f"checkpoint '{path}' holds no EMA weights ('{EMA_GROUP}*' tensors); groups: {groups}")
    return found


def _check_against_config(found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]],
                          cfg: RunConfig, path: Path) -> None:
    """The usual mismatches (K, LoRA rank) get their own message; anything else a per-key one."""
    where = f"checkpoint '{path}' does not match config '{cfg.name}'"
    logits = _STUDENT_PREFIXES["heads"] + "logits.bias"
    if logits in found and found[logits] != expected[logits]:
        modes = found[logits][0] // PATCH**2
        raise ValueError(f"{where}: it has K={modes} modes, model.num_modes={cfg.model.num_modes}")
    ranks = {shape[0] for key, shape in found.items() if ".lora_A." in key}
    if ranks and ranks != {cfg.model.lora_rank}:
        raise ValueError(f"{where}: its LoRA rank is {sorted(ranks)}, model.lora_rank={cfg.model.lora_rank}")
    check_shapes(found, expected, where)


def read_student_ema(cfg: RunConfig, checkpoint: str | Path) -> tuple[dict[str, Tensor], int]:
    """The EMA weights of the checkpoint (or a run dir's latest), checked against ``cfg``."""
    family = get_family(cfg.model.backbone)
    if cfg.model.lora_rank < 1:
        raise ValueError(f"config key 'model.lora_rank': export needs LoRA adapters, got {cfg.model.lora_rank}")
    path = ckpt.resolve_checkpoint(checkpoint)
    found = _checkpoint_ema_shapes(path)
    transformer = base_transformer_on_meta(cfg.model.pretrained, family)
    expected = student_ema_shapes(transformer, cfg.model.num_modes, cfg.model.lora_rank,
                                  family.backbone.lora_target_regex(transformer))
    _check_against_config({key: shape for key, (shape, _) in found.items()}, expected, cfg, path)
    ema = {key: torch.empty(shape, dtype=dtype) for key, (shape, dtype) in found.items()}
    state = ckpt.load_checkpoint(path, {"ema": ema})
    return ema, int(state["iteration"])


def split_student_state(ema: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Backbone parameter names -> (diffusers LoRA keys, heads-file keys)."""
    lora, heads = {}, {}
    for key, tensor in ema.items():
        match = _LORA_KEY.match(key)
        if match:
            lora[f"transformer.{match.group(1)}.{match.group(2)}.weight"] = tensor
            continue
        group = next(g for g, prefix in _STUDENT_PREFIXES.items() if key.startswith(prefix))
        heads[f"{group}.{key[len(_STUDENT_PREFIXES[group]):]}"] = tensor
    return lora, heads


def join_student_state(lora: dict[str, Tensor], heads: dict[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of :func:`split_student_state`: adapter files' keys -> backbone parameter names."""
    joined = {}
    for key, tensor in lora.items():
        module, kind = key[len("transformer."):].rsplit(".", 2)[:2] if key.startswith("transformer.") else ("", "")
        if kind not in ("lora_A", "lora_B") or not key.endswith(".weight"):
            raise ValueError(f"unexpected LoRA key '{key}' (expected transformer.<module>.lora_[AB].weight)")
        joined[f"transformer.{module}.{kind}.{ADAPTER_NAME}.weight"] = tensor
    for key, tensor in heads.items():
        group, rest = key.split(".", 1)
        if group not in _STUDENT_PREFIXES:
            raise ValueError(f"unexpected heads key '{key}' (expected {' or '.join(_STUDENT_PREFIXES)}.*)")
        joined[_STUDENT_PREFIXES[group] + rest] = tensor
    return joined


def write_adapter(out_dir: str | Path, lora: dict[str, Tensor], heads: dict[str, Tensor],
                  config: AdapterConfig) -> Path:
    """Write the adapter folder atomically: built under a hidden name, then renamed into place.

    ``out_dir`` may be absent, empty, or an earlier adapter folder (replaced); anything else
    is refused, so a typo cannot wipe an unrelated folder.
    """
    out = Path(out_dir).absolute()
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / CONFIG_FILE).is_file())):
        raise FileExistsError(f"--out-dir '{out}' exists and is not an ArcFlow adapter folder; not overwriting it")
    dtype = getattr(torch, config.dtype)
    targets = sorted({key[len("transformer."):].rsplit(".lora_", 1)[0] for key in lora})
    header = {"format": "pt", LORA_ADAPTER_METADATA_KEY: json.dumps(
        lora_metadata(config.lora_rank, config.lora_alpha, targets), indent=2, sort_keys=True)}
    cast = lambda d: {k: v.detach().to("cpu", dtype).contiguous() for k, v in sorted(d.items())}  # noqa: E731
    lora, heads = cast(lora), cast(heads)
    bad = ckpt.first_non_finite({"lora": lora, "heads": heads})  # after the cast: float16 overflows to inf
    if bad is not None:
        raise ValueError(f"not exporting to '{out}': tensor '{bad}' holds NaN or infinity in {config.dtype}")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file(lora, staging / LORA_FILE, metadata=header)
        save_file(heads, staging / HEADS_FILE, metadata={"format": "pt"})
        config.save(staging / CONFIG_FILE)
        (staging / "README.md").write_text(_MODEL_CARD.format(
            nfe=config.nfe, base=config.base_model, iteration=config.iteration, lora=LORA_FILE, heads=HEADS_FILE,
            config=CONFIG_FILE, adapter=ADAPTER_NAME, k=config.num_modes, shift=config.shift,
            guidance=config.guidance, pipeline=get_family(config.family).pipeline.__name__,
            text=config.max_sequence_length, sizes=", ".join(f"{h}x{w}" for h, w in config.resolutions[:8])),
            encoding="utf-8")
        write_checksums(staging)
        staging.chmod(0o755)
        old = None
        if out.exists():
            old = out.rename(out.with_name(f"{staging.name}.old"))
        staging.rename(out)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def export_adapter(cfg: RunConfig, checkpoint: str | Path, out_dir: str | Path, dtype: str | None = None) -> Path:
    """Checkpoint (EMA) -> adapter folder; returns the folder.

    ``dtype`` of the exported tensors defaults to the run's ``model.dtype`` (the precision the student
    was trained and validated in), or bfloat16 for a dtype an adapter cannot hold.
    """
    dtype = dtype or (cfg.model.dtype if cfg.model.dtype in DTYPES else "bfloat16")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    from arcflow.inference.student import trained_with  # student.py reads adapters with this module's helpers

    ema, iteration = read_student_ema(cfg, checkpoint)
    trained = trained_with(cfg, checkpoint)
    lora, heads = split_student_state(ema)
    model, distill = cfg.model, cfg.distill
    config = AdapterConfig(
        base_model=model.pretrained, num_modes=model.num_modes, shift=distill.shift, nfe=distill.nfe,
        timestep_ratio=distill.timestep_ratio, total_substeps=distill.total_substeps, guidance=model.guidance,
        lora_rank=model.lora_rank, lora_alpha=float(model.lora_alpha), lora_dropout=model.lora_dropout,
        dtype=dtype, iteration=iteration, family=model.backbone, max_sequence_length=trained.max_sequence_length,
        resolutions=trained.resolutions)
    return write_adapter(out_dir, lora, heads, config)
