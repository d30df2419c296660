"""What does the evaluation cost? Metric feature extraction per image, and the full HPSv2 protocol projected.

Measures, on this machine, the time per image of each metric network (torch-fidelity's Inception,
open_clip ViT-L-14, LPIPS-alex on 1024 px images; random weights: the cost does not depend on the
values) and counts the FLOPs of each with ``torch.utils.flop_counter``. The FLUX.1-dev transformer
and VAE decoder are counted the same way on the meta device (their published configs). The
projection for one H100 divides the FLOPs by its dense bf16 peak (989 TFLOP/s) at an assumed
utilisation, printed beside the result.

    python benchmarks/eval_cost.py [--prompts 3200] [--threads 2]     # needs the eval extra
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from arcflow.models.flux.backbone import FLUX_DEV_TRANSFORMER

H100_BF16_FLOPS = 989e12
UTILISATION = {"transformer": 0.45, "vae": 0.3, "metrics": 0.2}
"""Assumed fractions of the peak: large matmuls do best; convolutions at small batch less."""
FLUX_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=2, use_quant_conv=False, use_post_quant_conv=False)


def flops(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def seconds_per_image(fn, batch: int, repeats: int = 2) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / (repeats * batch)


def metric_networks(batch: int) -> dict[str, dict[str, float]]:
    import lpips
    import open_clip
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class RandomInception(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None

    empty = "/tmp/arcflow_empty_state.pth"
    torch.save({}, empty)
    inception = RandomInception("inception-v3-compat", ["2048"], feature_extractor_weights_path=empty)
    clip = open_clip.create_model("ViT-L-14", pretrained=None).eval()
    lpips_net = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False).eval()
    images = torch.randint(0, 256, (batch, 3, 1024, 1024), dtype=torch.uint8)
    crops = images[..., 362:661, 362:661].contiguous()
    pixels = torch.rand(batch, 3, 224, 224)
    tokens = open_clip.get_tokenizer("ViT-L-14")(["a photo of a cat"] * batch)
    floats = images.float() / 127.5 - 1
    runs = {
        "inception (FID, resized to 299)": lambda: inception(images),
        "inception (patch-FID crop)": lambda: inception(crops),
        "open_clip ViT-L-14 (image + text)": lambda: (clip.encode_image(pixels), clip.encode_text(tokens)),
        "LPIPS alex (1024 px pair)": lambda: lpips_net(floats, floats.flip(0)),
    }
    out = {}
    with torch.no_grad():
        for name, fn in runs.items():
            out[name] = {"cpu_seconds_per_image": seconds_per_image(fn, batch),
                         "gflops_per_image": flops(fn) / batch / 1e9}
    return out


def flux_flops() -> dict[str, float]:
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    with torch.device("meta"):
        transformer = FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER)
        vae = AutoencoderKL(**FLUX_VAE)
        tokens, text = 64 * 64, 512
        hidden = torch.zeros(1, tokens, 64)
        forward = flops(lambda: transformer(
            hidden_states=hidden, encoder_hidden_states=torch.zeros(1, text, 4096),
            pooled_projections=torch.zeros(1, 768),
            timestep=torch.ones(1), img_ids=torch.zeros(tokens, 3), txt_ids=torch.zeros(text, 3),
            guidance=torch.ones(1), return_dict=False))
        decode = flops(lambda: vae.decode(torch.zeros(1, 16, 128, 128)))
    return {"transformer_forward": forward, "vae_decode": decode}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=3200)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    metrics = metric_networks(args.batch)
    flux = flux_flops()
    h100 = lambda f, kind: f / (H100_BF16_FLOPS * UTILISATION[kind])  # noqa: E731
    teacher = 50 * h100(flux["transformer_forward"], "transformer") + h100(flux["vae_decode"], "vae")
    student = 2 * h100(flux["transformer_forward"], "transformer") + h100(flux["vae_decode"], "vae")
    # FID-T, pFID-T, CLIP, LPIPS: the student's images and the teacher's (twice each but LPIPS, a pair).
    metric_flops = 2 * sum(m["gflops_per_image"] for name, m in metrics.items() if "LPIPS" not in name) * 1e9
    metric_flops += metrics["LPIPS alex (1024 px pair)"]["gflops_per_image"] * 1e9
    per_image = {"teacher_50_steps": teacher, "student_2_nfe": student, "metrics": h100(metric_flops, "metrics")}
    report = {"machine": f"CPU, {args.threads} threads, torch {torch.__version__}", "metric_networks": metrics,
              "flux_gflops": {k: v / 1e9 for k, v in flux.items()}, "h100_utilisation_assumed": UTILISATION,
              "h100_seconds_per_image": per_image,
              "h100_hours_for_prompts": {k: v * args.prompts / 3600 for k, v in per_image.items()},
              "prompts": args.prompts}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
