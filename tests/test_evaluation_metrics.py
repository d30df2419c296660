"""The metric libraries' real networks (torch-fidelity's Inception, open_clip, lpips) with random weights.

No hub is reachable, so the weights files the libraries would download are made here from the
same networks with random weights and put where the libraries look (torch's hub cache) or named
in the config: the plumbing is real, the numbers mean nothing and are only checked for
consistency. Our FID is checked against a direct float64 formula (scipy ``sqrtm``).

These need the ``eval`` extra (torchvision built for the installed torch); ``.ci/run`` runs this
file in an environment that has it.
"""

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

if os.environ.get("ARCFLOW_EVAL_LIBS") != "required":  # .ci/run's eval environment: missing libraries fail
    for module in ("torchvision", "torch_fidelity", "open_clip", "lpips"):
        pytest.importorskip(module, reason="the eval extra: .ci/run runs this file in its eval environment")
import open_clip  # noqa: E402
import scipy.linalg  # noqa: E402
import torchvision  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from test_evaluation import REPO, evaluate, trained  # noqa: E402,F401  (the module's fixture)
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3  # noqa: E402

from arcflow.cli import main  # noqa: E402
from arcflow.config import EvalConfig  # noqa: E402
from arcflow.metrics import networks  # noqa: E402
from arcflow.metrics.suite import MetricSuite, MetricUnavailable, Pairs, frechet_distance  # noqa: E402

TINY_CLIP = {"embed_dim": 32, "quick_gelu": True,
             "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


class _RandomInception(FeatureExtractorInceptionV3):
    """torch-fidelity's network, keeping its random initialisation instead of loading weights."""

    def load_state_dict(self, state_dict, strict=True, assign=False):
        return None


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory) -> dict[str, Path]:
    """Random-weight files of the real networks, laid out where the libraries look for theirs."""
    root = tmp_path_factory.mktemp("weights")
    checkpoints = root / "torch_home" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.manual_seed(0)
    empty = root / "empty.pth"
    torch.save({}, empty)
    inception = _RandomInception("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    # Random convolutions shrink activations to ~1e-8 by the last layer; batch statistics of one batch in the
    # normalisation layers keep them O(1), so different images give different features.
    for module in inception.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None
    with torch.no_grad():
        inception.train()(_images(4, 299, 9))
    torch.save(inception.state_dict(), checkpoints / URL_INCEPTION_V3.rsplit("/", 1)[-1])
    alexnet = torchvision.models.alexnet(weights=None)
    alexnet_file = torchvision.models.AlexNet_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1]
    torch.save(alexnet.state_dict(), checkpoints / alexnet_file)
    clip_config = root / "arcflow-tiny-clip.json"
    clip_config.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(clip_config)
    clip = open_clip.create_model(clip_config.stem, pretrained=None)
    clip_weights = root / "tiny_clip.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(clip_weights))
    return {"torch_home": root / "torch_home", "clip_config": clip_config, "clip_weights": clip_weights}


@pytest.fixture
def hub(random_weights, monkeypatch) -> dict[str, Path]:
    monkeypatch.setenv("TORCH_HOME", str(random_weights["torch_home"]))
    return random_weights


def _config(hub: dict[str, Path], **extra) -> EvalConfig:
    """The test networks; FID on Inception's 64-d features keeps the 2048 x 2048 matrix algebra out of CI."""
    values = {"clip_model": str(hub["clip_config"]), "clip_pretrained": str(hub["clip_weights"]), "fid_features": 64}
    return EvalConfig(**{**values, **extra})


def _images(count: int, size: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, generator=generator)


def test_fid_matches_a_direct_float64_formula():
    generator = np.random.default_rng(0)
    a = generator.normal(size=(300, 6))
    b = generator.normal(size=(250, 6)) @ generator.normal(size=(6, 6)) * 0.7 + 0.3
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(cov_a @ cov_b).real
    direct = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))
    assert frechet_distance(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(direct, rel=1e-9)
    assert frechet_distance(torch.from_numpy(a), torch.from_numpy(a)) == pytest.approx(0, abs=1e-9)


def test_fid_features_and_real_statistics_with_torch_fidelity_inception(hub, tmp_path):
    images = _images(4, 320, 0)
    folder = tmp_path / "real"
    folder.mkdir()
    for index, image in enumerate(images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{index}.png")
    metric = networks.fid_metric(_config(hub, real_images=str(folder)), torch.device("cpu"))
    rows = metric.rows(Pairs(["a"] * 4, images, images.flip(0), torch.zeros(4, 1), torch.zeros(4, 1)))
    assert rows["fid/candidate"].shape == (4, 64) and rows["pfid/candidate"].shape == (4, 64)
    # The same images in another order: the same feature set, so every FID is ~0 (real = these images too).
    values, reasons = metric.compute(rows)
    assert values["fid_teacher"] == pytest.approx(0, abs=1e-3) and values["pfid_teacher"] == pytest.approx(0, abs=1e-3)
    assert values["fid_real"] == pytest.approx(0, abs=1e-3) and not reasons
    other = metric.compute({**rows, "fid/reference": metric.inception(_images(4, 320, 1))})[0]
    assert other["fid_teacher"] > 1e-3
    stats = tmp_path / "real.npz"
    np.savez(stats, mu=metric.real_stats[0], sigma=metric.real_stats[1])
    from_npz = networks.fid_metric(_config(hub, real_images=str(stats)), torch.device("cpu"))
    np.testing.assert_allclose(from_npz.real_stats[1], metric.real_stats[1])


def test_clip_score_with_a_random_open_clip_model(hub):
    score = networks.clip_scorer(_config(hub), torch.device("cpu"))
    images = _images(3, 40, 2)
    values = score(["a red circle", "a blue square", "a green ring"], images)
    assert values.shape == (3,) and bool(((values >= 0) & (values <= 100)).all())
    torch.testing.assert_close(values, score(["a red circle", "a blue square", "a green ring"], images))
    assert not torch.equal(values, score(["a cat", "a dog", "a cow"], images))


def test_lpips_with_its_network_on_a_random_backbone(hub):
    network = networks.lpips_network(_config(hub), torch.device("cpu"))
    a, b = _images(2, 64, 3).float() / 127.5 - 1, _images(2, 64, 4).float() / 127.5 - 1
    assert float(network(a, a).abs().max()) < 1e-6 and bool((network(a, b) > 0).all())


def test_without_weights_on_the_machine_metrics_are_unavailable(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    suite = MetricSuite.build(EvalConfig(), ("fid", "lpips", "clip"), torch.device("cpu"))
    assert not suite.metrics
    assert "not on this machine" in suite.unavailable["fid_teacher"]
    assert "not on this machine" in suite.unavailable["lpips"]
    assert "Hugging Face cache" in suite.unavailable["clip_score"]


class _Payload:
    def __reduce__(self):
        return (print, ("this would run",))


def test_weights_files_that_would_run_code_are_refused(tmp_path):
    path = tmp_path / "bad.pth"
    with open(path, "wb") as f:
        pickle.dump({"weight": _Payload()}, f)
    with pytest.raises(ValueError, match="not a plain tensor state dict"):
        networks.checked_state_dict(path)


def test_eval_end_to_end_with_the_library_networks(trained, hub, tmp_path):  # noqa: F811
    store = tmp_path / "store"
    options = {"eval_cfg.clip_model": str(hub["clip_config"]), "eval_cfg.clip_pretrained": str(hub["clip_weights"]),
               "eval_cfg.patch_size": 32, "eval_cfg.fid_features": 64, "eval_cfg.metrics": "[alignment,fid,clip,lpips]"}
    options["eval_cfg.num_prompts"] = 3
    evaluate(trained, tmp_path / "first", store, "--ckpt", str(trained["run"]),
             **{**options, "eval_cfg.metrics": "[alignment]"})
    [teacher] = [p for p in store.iterdir() if p.is_dir()]
    metrics = evaluate(trained, tmp_path / "eval", store, "--ckpt", str(trained["run"]), "--real-images", str(teacher),
                       **options)
    for name in ("fid_teacher", "pfid_teacher", "fid_real", "fid_real_teacher", "clip_score", "clip_score_teacher",
                 "lpips", "latent_mse", "psnr"):
        assert isinstance(metrics[name], float), (name, metrics["unavailable"].get(name))
    assert metrics["fid_real_teacher"] == pytest.approx(0, abs=1e-2)  # the real set is the teacher's images
    assert metrics["hpsv2"] is None and "hpsv2" in metrics["unavailable"]


def test_validation_logs_the_evaluation_metrics(tiny_flux_dir, tmp_path, hub):
    run = tmp_path / "run"
    main(["train", str(REPO / "configs/demo/arcflux_tiny_2nfe.py"), "--work-dir", str(run), "--cfg-options",
          f"model.pretrained={tiny_flux_dir}", "data.cache=never", "train_cfg.batch_size=2", "total_iters=1",
          "eval_interval=1", "val_cfg.num_prompts=2", "val_cfg.teacher_steps=4", "val_cfg.metrics=[fid,clip,lpips]",
          "val_cfg.metrics_num_prompts=2", f"eval_cfg.clip_model={hub['clip_config']}",
          f"eval_cfg.clip_pretrained={hub['clip_weights']}", "eval_cfg.fid_features=64", "save_interval=1000"])
    records = [json.loads(line) for line in (run / "val_metrics.jsonl").read_text().splitlines()]
    assert {"student_2nfe/fid_teacher", "student_2nfe/clip_score", "student_2nfe/lpips"} <= set(records[-1])
    assert "student_2nfe/pfid_teacher" not in records[-1]  # 128 px images are smaller than the 299 px crop


def test_a_missing_clip_file_is_an_error_and_an_uncached_tag_unavailable(hub):
    with pytest.raises(FileNotFoundError, match="eval_cfg.clip_pretrained"):
        networks.clip_scorer(_config(hub, clip_pretrained="missing.safetensors"), torch.device("cpu"))
    with pytest.raises(MetricUnavailable, match="Hugging Face cache"):
        networks.clip_scorer(EvalConfig(clip_model="ViT-B-32", clip_pretrained="openai"), torch.device("cpu"))
