"""The metric libraries' networks, loaded only from weights that are on this machine.

Each loader either returns a working network or raises :class:`MetricUnavailable` saying what is
missing: the library (``pip install 'arcflow[eval]'``) or the weights (in the library's own cache,
a configured file, or downloaded by the library itself when ``eval_cfg.download_weights`` is on).
Weights files are opened with ``torch.load(weights_only=True)`` (or safetensors) before any library
loads them its own way, so a file on disk cannot run code.
"""

from __future__ import annotations

import importlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from arcflow.config import EvalConfig
from arcflow.images import read_png
from arcflow.metrics.suite import FIDMetric, MetricUnavailable

INSTALL_HINT = "pip install 'arcflow[eval]'"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
Scorer = Callable[[list[str], Tensor], Tensor]


def _require(module: str, package: str, hint: str = INSTALL_HINT) -> ModuleType:
    try:
        return importlib.import_module(module)
    except Exception as err:  # ImportError, or a broken torchvision raising RuntimeError at import
        raise MetricUnavailable(f"{package} is not importable ({type(err).__name__}: {err}); {hint}") from None


def hub_checkpoint(url: str) -> Path:
    """Where ``torch.hub`` keeps the file of ``url`` (torchvision and torch-fidelity download there)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def _weights_file(path: Path, url: str, what: str, cfg: EvalConfig) -> Path:
    """``path`` if present; else downloaded from ``url`` when allowed; else unavailable."""
    if path.is_file():
        return path
    if not cfg.download_weights:
        raise MetricUnavailable(f"{what} weights are not on this machine (expected {path}); run once with "
                                "--download-weights on a connected machine, or copy the file there")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.hub.download_url_to_file(url, str(path))
    return path


def checked_state_dict(path: Path) -> dict[str, Tensor]:
    """A plain tensor state dict from ``path``, refusing anything that would need code to unpickle."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError for disallowed globals, RuntimeError for a bad archive
        raise ValueError(f"weights file '{path}' is not a plain tensor state dict "
                         f"({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"weights file '{path}' does not hold a flat dict of tensors")
    return state


# -- FID ------------------------------------------------------------------------------------------
def inception_features(cfg: EvalConfig, device: torch.device) -> Callable[[Tensor], Tensor]:
    """torch-fidelity's InceptionV3 (the TF-FID port; pool3 2048-d features by default) from local weights."""
    _require("torch_fidelity", "torch-fidelity")
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3

    path = Path(cfg.inception_weights) if cfg.inception_weights else hub_checkpoint(URL_INCEPTION_V3)
    state = checked_state_dict(_weights_file(path, URL_INCEPTION_V3, "FID Inception", cfg))
    # torch-fidelity loads its file with weights_only=False: hand it a copy we wrote from checked tensors.
    with tempfile.TemporaryDirectory() as tmp:
        checked = Path(tmp) / "inception.pth"
        torch.save(state, checked)
        model = FeatureExtractorInceptionV3("inception-v3-compat", [str(cfg.fid_features)],
                                            feature_extractor_weights_path=str(checked)).to(device)

    def features(images: Tensor) -> Tensor:
        return model(images.to(device))[0].float()

    return features


def real_statistics(cfg: EvalConfig, features: Callable[[Tensor], Tensor]
                    ) -> tuple[tuple[np.ndarray, np.ndarray] | None, str]:
    """(mu, sigma) of the real images for fid_real, or None and why."""
    if not cfg.real_images:
        return None, "no real images given (eval_cfg.real_images / --real-images: a folder or an .npz of mu, sigma)"
    path = Path(cfg.real_images)
    if path.suffix == ".npz":
        if not path.is_file():
            raise FileNotFoundError(f"eval_cfg.real_images '{path}' not found")
        with np.load(path, allow_pickle=False) as stats:
            if "mu" not in stats or "sigma" not in stats:
                raise ValueError(f"eval_cfg.real_images '{path}' must hold arrays 'mu' and 'sigma', has {stats.files}")
            mu, sigma = stats["mu"], stats["sigma"]
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise ValueError(f"eval_cfg.real_images '{path}': mu {mu.shape} and sigma {sigma.shape} do not match")
        return (mu, sigma), ""
    if not path.is_dir():
        raise FileNotFoundError(f"eval_cfg.real_images '{path}' is neither an .npz file nor a folder of images")
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) < 2:
        raise ValueError(f"eval_cfg.real_images '{path}' has {len(files)} image(s); FID needs at least 2")
    rows = []
    by_size: dict[tuple[int, ...], list[Tensor]] = {}
    for file in files:
        image = read_png(file)
        batch = by_size.setdefault(tuple(image.shape), [])
        batch.append(image)
        if len(batch) == cfg.feature_batch_size:
            rows.append(features(torch.stack(batch)).cpu())
            batch.clear()
    rows.extend(features(torch.stack(batch)).cpu() for batch in by_size.values() if batch)
    all_features = torch.cat(rows).double().numpy()
    return (all_features.mean(0), np.cov(all_features, rowvar=False)), ""


def fid_metric(cfg: EvalConfig, device: torch.device) -> FIDMetric:
    features = inception_features(cfg, device)
    stats, reason = real_statistics(cfg, features)
    return FIDMetric(features, cfg.patch_size, stats, reason)


# -- CLIP score -----------------------------------------------------------------------------------
def _open_clip_cached(open_clip: ModuleType, name: str, tag: str) -> str | None:
    """The local file of open_clip's pretrained ``tag`` in the Hugging Face cache, if it was downloaded."""
    from huggingface_hub import try_to_load_from_cache

    pretrained = open_clip.get_pretrained_cfg(name, tag)
    if not pretrained:
        raise ValueError(f"config key 'eval_cfg.clip_pretrained': open_clip has no pretrained {tag!r} for {name!r} "
                         f"(known: {open_clip.list_pretrained_tags_by_model(name)})")
    if not pretrained.get("hf_hub"):
        return None
    repo, filename = os.path.split(pretrained["hf_hub"])  # open_clip's convention: 'org/repo/' means its default file
    candidates = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    if filename.endswith((".bin", ".pth")):
        candidates.insert(0, filename[:-4] + ".safetensors")
    for candidate in candidates:
        found = try_to_load_from_cache(repo, candidate)
        if isinstance(found, str):
            return found
    return None


def clip_model_name(open_clip: ModuleType, model: str) -> str:
    """An open_clip model name; a JSON file is registered as a model config first (tests, custom towers)."""
    if model.endswith(".json"):
        path = Path(model)
        if not path.is_file():
            raise FileNotFoundError(f"config key 'eval_cfg.clip_model': '{path}' not found")
        open_clip.add_model_config(path)
        return path.stem
    if model not in open_clip.list_models():
        raise ValueError(f"config key 'eval_cfg.clip_model': open_clip has no model {model!r}")
    return model


def clip_scorer(cfg: EvalConfig, device: torch.device) -> Scorer:
    """CLIP score, 100 * max(cos(image, prompt), 0), with an open_clip model and its own preprocessing."""
    open_clip = _require("open_clip", "open_clip_torch")
    name = clip_model_name(open_clip, cfg.clip_model)
    weights = cfg.clip_pretrained
    if Path(weights).is_file():
        if not weights.endswith(".safetensors"):
            checked_state_dict(Path(weights))
    elif Path(weights).suffix in (".safetensors", ".bin", ".pt", ".pth"):
        raise FileNotFoundError(f"config key 'eval_cfg.clip_pretrained': '{weights}' not found")
    else:
        cached = _open_clip_cached(open_clip, name, weights)
        if cached is None and not cfg.download_weights:
            raise MetricUnavailable(f"open_clip {name} '{weights}' weights are not in the Hugging Face cache; run once "
                                    "with --download-weights on a connected machine, or set eval_cfg.clip_pretrained "
                                    "to a local file")
        weights = cached or weights
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=weights, device=device,
                                                                 weights_only=True)
    model.eval()
    tokenizer = open_clip.get_tokenizer(name)

    @torch.no_grad()
    def score(prompts: list[str], images: Tensor) -> Tensor:
        pixels = torch.stack([preprocess(Image.fromarray(image.permute(1, 2, 0).cpu().numpy())) for image in images])
        image_features = F.normalize(model.encode_image(pixels.to(device)).float(), dim=-1)
        text_features = F.normalize(model.encode_text(tokenizer(prompts).to(device)).float(), dim=-1)
        return 100 * (image_features * text_features).sum(-1).clamp(min=0)

    return score


# -- LPIPS ----------------------------------------------------------------------------------------
def lpips_network(cfg: EvalConfig, device: torch.device) -> nn.Module:
    """lpips' LPIPS (its linear layers ship in the package; the backbone is torchvision's ImageNet one)."""
    lpips = _require("lpips", "lpips")
    models = _require("torchvision.models", "torchvision")
    backbones = {"alex": models.AlexNet_Weights.IMAGENET1K_V1, "vgg": models.VGG16_Weights.IMAGENET1K_V1,
                 "squeeze": models.SqueezeNet1_1_Weights.IMAGENET1K_V1}
    if cfg.lpips_net not in backbones:
        raise ValueError(f"config key 'eval_cfg.lpips_net': expected one of {sorted(backbones)}, got {cfg.lpips_net!r}")
    url = backbones[cfg.lpips_net].url
    checked_state_dict(_weights_file(hub_checkpoint(url), url, f"LPIPS {cfg.lpips_net} backbone", cfg))
    return lpips.LPIPS(net=cfg.lpips_net, verbose=False).to(device).eval()


# -- HPSv2.1 and ImageReward: used where installed and their weights are cached ----------------------
def _hf_cached(repo: str, filename: str) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, filename)
    return found if isinstance(found, str) else None


def _pil(image: Tensor) -> Image.Image:
    return Image.fromarray(image.permute(1, 2, 0).cpu().numpy())


def hpsv2_scorer(cfg: EvalConfig, device: torch.device) -> Scorer:
    """HPSv2.1 through the hpsv2 package (its ViT-H-14 and the v2.1 head), one prompt at a time as its API scores."""
    hpsv2 = _require("hpsv2", "hpsv2", "pip install hpsv2 (not in the eval extra: it pins pytest 7, protobuf 3)")
    needed = {("xswu/HPSv2", "HPS_v2.1_compressed.pt"),
              ("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "open_clip_pytorch_model.bin")}
    missing = sorted(f"{repo}/{name}" for repo, name in needed if _hf_cached(repo, name) is None)
    if missing and not cfg.download_weights:
        raise MetricUnavailable(f"HPSv2.1 weights are not in the Hugging Face cache ({', '.join(missing)}); "
                                "run once with --download-weights on a connected machine")
    checkpoint = _hf_cached("xswu/HPSv2", "HPS_v2.1_compressed.pt")

    def score(prompts: list[str], images: Tensor) -> Tensor:
        return torch.tensor([float(hpsv2.score([_pil(image)], prompt, cp=checkpoint, hps_version="v2.1")[0])
                             for prompt, image in zip(prompts, images)])

    return score


def image_reward_scorer(cfg: EvalConfig, device: torch.device) -> Scorer:
    """ImageReward-v1.0 through its package, where installed and its weights are in its cache folder."""
    reward = _require("ImageReward", "ImageReward", "pip install image-reward (optional: it pins timm 0.6)")
    root = Path("~/.cache/ImageReward").expanduser()
    missing = [name for name in ("ImageReward.pt", "med_config.json") if not (root / name).is_file()]
    if missing and not cfg.download_weights:
        raise MetricUnavailable(f"ImageReward weights are not in {root} (missing {', '.join(missing)}); run once "
                                "with --download-weights on a connected machine")
    model = reward.load("ImageReward-v1.0", device=device, download_root=str(root))

    @torch.no_grad()
    def score(prompts: list[str], images: Tensor) -> Tensor:
        return torch.tensor([float(model.score(prompt, [_pil(image)])) for prompt, image in zip(prompts, images)])

    return score
