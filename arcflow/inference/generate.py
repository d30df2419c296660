"""``arcflow generate``: images from an exported adapter on its base model, saved as one PNG grid.

    arcflow generate --base black-forest-labs/FLUX.1-dev --adapter DIR --prompt "a cat" --out cat.png

One row per prompt (captioned with it), ``num_images`` columns. Prompt i draws its noise from
seed ``seed + i`` on the CPU, so an image depends neither on the other prompts nor on the device.
Every setting left out (NFE, size, text length, guidance) is the one the adapter was trained with.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from arcflow.images import save_grid
from arcflow.inference.commands import Prompt
from arcflow.models import check_family_of_pretrained, get_family
from arcflow.models.adapter import CONFIG_FILE, AdapterConfig, adapter_file
from arcflow.models.hub import require_pretrained


@torch.no_grad()
def generate_grid(base: str, adapter: str, prompts: list[Prompt], out: str | Path, nfe: int | None = None,
                  timestep_ratio: float | None = None, seed: int = 0, num_images: int = 1,
                  device: str | None = None, dtype: str | None = None, cpu_offload: bool = False,
                  max_sequence_length: int | None = None, guidance_scale: float | None = None) -> Path:
    """Load ``base`` + ``adapter``, sample every prompt ``num_images`` times, write the grid to ``out``."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = getattr(torch, dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    family = get_family(AdapterConfig.load(adapter_file(adapter, CONFIG_FILE)).family)
    require_pretrained(base, "--base")
    check_family_of_pretrained(base, family.name, "--base", f"adapter '{adapter}'")
    pipe = family.pipeline.from_pretrained(base, dtype=torch_dtype)
    if cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    config = pipe.load_arcflow_adapter(adapter)
    pipe.set_progress_bar_config(disable=True)  # one bar over all images instead of one per call
    rows = []
    with tqdm(total=len(prompts) * num_images, unit="image", desc="generate") as bar:
        for index, prompt in enumerate(prompts):
            images = pipe(prompt.text, height=prompt.height, width=prompt.width, num_inference_steps=nfe,
                          timestep_ratio=timestep_ratio, num_images_per_prompt=num_images,
                          max_sequence_length=max_sequence_length, guidance_scale=guidance_scale,
                          generator=torch.Generator().manual_seed(seed + index), output_type="pt").images
            rows.append([image.float().cpu() for image in images])
            bar.update(num_images)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    steps = nfe or config.nfe
    labels = [f"{steps} NFE, #{j + 1}" for j in range(num_images)]
    captions = [f"{p.text}  (seed {seed + i})" for i, p in enumerate(prompts)]
    info = {"adapter": str(adapter), "base": str(base), "nfe": steps, "seed": seed,
            "prompts": [p.text for p in prompts]}
    save_grid(rows, out, column_labels=labels, row_captions=captions, info=info)
    print(f"wrote {out}: {len(prompts)} prompt(s) x {num_images} image(s), {steps} NFE")
    return out
