"""ArcFluxPipeline on the tiny FLUX: the trainer's sampler, exactly n transformer calls, LoRA mixing,
a clean unload back to FluxPipeline, load errors, and ``arcflow generate``."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from peft.tuners.tuners_utils import BaseTunerLayer
from PIL import Image
from safetensors.torch import save_file

from arcflow.cli import main
from arcflow.config import load_config
from arcflow.images import GRID_INFO_KEY, grid_cell
from arcflow.inference.student import load_ema_student
from arcflow.method.sampling import sample_student
from arcflow.models.adapter import CONFIG_FILE, HEADS_FILE, AdapterConfig
from arcflow.models.base import pack, unpack
from arcflow.pipelines import ArcFluxPipeline

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs/demo/arcflux_tiny_2nfe.py")


@pytest.fixture(scope="module")
def setup(tiny_flux_dir, tmp_path_factory):
    """Two real training iterations (large lr, no warm-up: the LoRA and heads move) and their export."""
    root = tmp_path_factory.mktemp("pipeline")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)  # the demo config names its prompt set relative to the repository
        main(["train", DEMO, "--work-dir", str(root / "run"), "--cfg-options", f"model.pretrained={tiny_flux_dir}",
              "train_cfg.batch_size=2", "total_iters=2", "save_interval=2", "eval_interval=0",
              "optimizer.lr=0.05", "optimizer.warmup_iters=0"])
    main(["export", DEMO, "--ckpt", str(root / "run"), "--out-dir", str(root / "adapter"), "--dtype", "float32",
          "--cfg-options", f"model.pretrained={tiny_flux_dir}"])
    return load_config(DEMO, {"model.pretrained": str(tiny_flux_dir)}), root / "run", root / "adapter"


@pytest.fixture(scope="module")
def cond(setup):
    cfg, run, _ = setup
    backbone, text_encoder, _ = load_ema_student(cfg, run, torch.device("cpu"))
    return backbone, text_encoder.encode(["a red circle", "two blue squares at the top"])


def arcflux(tiny: Path, adapter: Path | None = None, fuse: bool | None = None) -> ArcFluxPipeline:
    pipe = ArcFluxPipeline.from_pretrained(tiny)
    pipe.set_progress_bar_config(disable=True)
    if adapter is not None:
        pipe.load_arcflow_adapter(adapter, fuse=fuse)
    return pipe


def latents_of(pipe, cond, noise, **kwargs) -> torch.Tensor:
    """The pipeline's final latents, unpacked to (B, 16, H, W), for packed ``noise`` of that shape."""
    h, w = noise.shape[-2:]
    packed = pipe(prompt_embeds=cond["prompt_embeds"], pooled_prompt_embeds=cond["pooled_prompt_embeds"],
                  latents=pack(noise), height=8 * h, width=8 * w, output_type="latent", **kwargs).images
    return unpack(packed, h, w)[:, 0]


def test_matches_the_trainers_sampler(setup, cond, tiny_flux_dir):
    cfg, _, adapter = setup
    backbone, embeddings = cond
    noise = torch.randn(2, 16, 8, 12, generator=torch.Generator().manual_seed(0))
    rng = torch.get_rng_state()
    pipe = arcflux(tiny_flux_dir, adapter)
    assert torch.equal(torch.get_rng_state(), rng)  # loading draws nothing from the global RNG
    default = latents_of(pipe, embeddings, noise)  # the adapter's defaults: 2 NFE, timestep_ratio 1
    torch.testing.assert_close(default, sample_student(backbone, noise, embeddings, 2, cfg.distill.shift, 1.0),
                               rtol=1e-5, atol=1e-5)
    ours = latents_of(pipe, embeddings, noise, num_inference_steps=3, timestep_ratio=0.5)
    torch.testing.assert_close(ours, sample_student(backbone, noise, embeddings, 3, cfg.distill.shift, 0.5),
                               rtol=1e-5, atol=1e-5)
    assert pipe.arcflow_fused and not any(isinstance(m, BaseTunerLayer) for m in pipe.transformer.modules())

    unfused = arcflux(tiny_flux_dir, adapter, fuse=False)  # the LoRA as a diffusers adapter: same student
    assert not unfused.arcflow_fused
    torch.testing.assert_close(latents_of(unfused, embeddings, noise), default, rtol=1e-5, atol=1e-5)
    # The LoRA is live: at weight 0 the result changes.
    unfused.set_adapters("arcflow", 0.0)
    assert (latents_of(unfused, embeddings, noise) - default).abs().mean() > 1e-2


def test_exactly_n_transformer_calls(setup, tiny_flux_dir):
    pipe = arcflux(tiny_flux_dir, setup[2])
    calls, steps = [], []
    pipe.transformer.register_forward_hook(lambda module, args, kwargs, out: calls.append(kwargs["timestep"]),
                                           with_kwargs=True)

    def on_step_end(pipeline, step, timestep, tensors):
        steps.append((step, float(timestep), tuple(tensors["latents"].shape)))
        return {}

    for nfe in (2, 3, 5):
        calls.clear(), steps.clear()
        images = pipe("a cat", height=64, width=32, num_inference_steps=nfe, max_sequence_length=32,
                      callback_on_step_end=on_step_end, generator=torch.Generator().manual_seed(0)).images
        assert len(calls) == nfe and images[0].size == (32, 64)
        assert [s for s, _, _ in steps] == list(range(nfe)) and steps[0][1] == pytest.approx(1000.0)
        assert all(shape == (1, (64 // 16) * (32 // 16), 64) for _, _, shape in steps)  # packed tokens
        first = [float(c[0]) for c in calls]
        assert first[0] == pytest.approx(1.0) and first == sorted(first, reverse=True)


def test_style_lora_mixes_with_the_student(setup, cond, tiny_flux_dir, tmp_path):
    _, embeddings = cond
    pipe = arcflux(tiny_flux_dir, setup[2], fuse=False)
    noise = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(2))
    student = latents_of(pipe, embeddings, noise)
    generator = torch.Generator().manual_seed(3)
    style = {}
    for name in ("transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.proj_mlp"):  # the 2nd shares a layer
        base = pipe.transformer.get_submodule(name)
        base = getattr(base, "base_layer", base)
        style[f"transformer.{name}.lora_A.weight"] = torch.randn(4, base.in_features, generator=generator)
        style[f"transformer.{name}.lora_B.weight"] = torch.randn(base.out_features, 4, generator=generator) * 0.1
    save_file(style, tmp_path / "style.safetensors")
    pipe.load_lora_weights(str(tmp_path / "style.safetensors"), adapter_name="style")

    with pytest.raises(ValueError, match="'arcflow' LoRA is not active"):  # diffusers activates only the new one
        latents_of(pipe, embeddings, noise)
    pipe.set_adapters(["arcflow", "style"], [1.0, 0.8])
    mixed = latents_of(pipe, embeddings, noise)
    assert (mixed - student).abs().mean() > 1e-2
    pipe.set_adapters(["arcflow", "style"], [1.0, 0.0])
    torch.testing.assert_close(latents_of(pipe, embeddings, noise), student, rtol=0, atol=0)

    pipe.unload_arcflow_adapter()  # the style LoRA stays, on the plain teacher
    assert list(pipe.transformer.peft_config) == ["style"] and pipe.get_active_adapters() == ["style"]
    with pytest.raises(ValueError, match=r"fuse=True needs the ArcFlow LoRA to be the only one, but \['style'\]"):
        pipe.load_arcflow_adapter(setup[2], fuse=True)
    pipe.load_arcflow_adapter(setup[2])
    assert not pipe.arcflow_fused  # another LoRA is loaded: left unfused, so set_adapters can weight both

    fused = arcflux(tiny_flux_dir, setup[2])  # fused, then a style LoRA applies on top of the student
    fused.load_lora_weights(str(tmp_path / "style.safetensors"), adapter_name="style")
    fused.set_adapters(["style"], [0.0])
    torch.testing.assert_close(latents_of(fused, embeddings, noise), student, rtol=1e-5, atol=1e-5)
    fused.set_adapters(["style"], [0.8])
    torch.testing.assert_close(latents_of(fused, embeddings, noise), mixed, rtol=1e-5, atol=1e-5)
    fused.unload_arcflow_adapter()
    assert list(fused.transformer.peft_config) == ["style"]


@pytest.mark.parametrize("fuse", [True, False])
def test_unload_gives_back_the_teacher(setup, cond, tiny_flux_dir, fuse):
    _, embeddings = cond
    pipe = arcflux(tiny_flux_dir)
    original = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    pipe.load_arcflow_adapter(setup[2], fuse=fuse)
    assert pipe.arcflow_fused == fuse
    noise = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(4))
    latents_of(pipe, embeddings, noise)
    pipe.unload_arcflow_adapter()
    restored = pipe.transformer.state_dict()
    assert list(restored) == list(original)
    assert all(torch.equal(restored[k], original[k]) for k in original)
    assert pipe.arcflow_config is None

    settings = dict(num_inference_steps=6, sigmas=[1 - i / 6 for i in range(6)], guidance_scale=3.5)
    reference = FluxPipeline.from_pretrained(tiny_flux_dir)
    reference.set_progress_bar_config(disable=True)
    for p in (pipe, reference):
        p.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.2, use_dynamic_shifting=False)
    torch.testing.assert_close(latents_of(pipe, embeddings, noise, **settings),
                               latents_of(reference, embeddings, noise, **settings), rtol=0, atol=0)


def test_load_and_call_errors(setup, tiny_flux_dir, tmp_path):
    adapter = setup[2]
    pipe = arcflux(tiny_flux_dir)
    with pytest.raises(ValueError, match="timestep_ratio needs an ArcFlow adapter"):
        pipe("x", timestep_ratio=0.5)
    with pytest.raises(FileNotFoundError, match="cannot find arcflow_config.json of ArcFlow adapter"):
        pipe.load_arcflow_adapter(tmp_path / "missing")

    partial = tmp_path / "partial"
    shutil.copytree(adapter, partial)
    (partial / HEADS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=f"'{partial}' has no {HEADS_FILE}"):
        pipe.load_arcflow_adapter(partial)

    wrong_k = tmp_path / "wrong_k"
    shutil.copytree(adapter, wrong_k)
    config = json.loads((wrong_k / CONFIG_FILE).read_text())
    (wrong_k / CONFIG_FILE).write_text(json.dumps({**config, "num_modes": 4}))
    message = r"\(K=4, .*does not fit this transformer: 'heads.means.weight' has shape \(1024, 32\)"
    with pytest.raises(ValueError, match=message):
        pipe.load_arcflow_adapter(wrong_k)
    (wrong_k / CONFIG_FILE).write_text(json.dumps({**config, "lora_rank": 16}))
    with pytest.raises(ValueError, match="has LoRA rank \\[8\\], but arcflow_config.json says lora_rank=16"):
        pipe.load_arcflow_adapter(wrong_k)
    assert pipe.arcflow_config is None and not getattr(pipe.transformer, "peft_config", None)  # nothing half-done

    pipe.load_arcflow_adapter(adapter)
    with pytest.raises(ValueError, match="already loaded"):
        pipe.load_arcflow_adapter(adapter)
    with pytest.raises(ValueError, match="must be >= 2"):
        pipe("x", num_inference_steps=1)
    with pytest.raises(TypeError, match=r"\['sigmas'\] only apply to the multi-step teacher"):
        pipe("x", sigmas=[1.0, 0.5])
    pipe.unload_arcflow_adapter()
    with pytest.raises(ValueError, match="no ArcFlow adapter is loaded"):
        pipe.unload_arcflow_adapter()


def test_generate_command_writes_a_grid(setup, tiny_flux_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('\n{"prompt": "a tall house", "height": 96}\n')
    out = tmp_path / "grid.png"
    main(["generate", "--base", str(tiny_flux_dir), "--adapter", str(setup[2]), "--prompt", "a red circle",
          "--prompts-file", str(prompts), "--num-images", "2", "--height", "64", "--width", "48", "--nfe", "3",
          "--out", str(out)])
    with Image.open(out) as grid:
        info = json.loads(grid.text[GRID_INFO_KEY])
        pixels = np.asarray(grid.convert("L"))
    assert [[cell[2:] for cell in row] for row in info["cells"]] == [[[48, 64]] * 2, [[48, 96]] * 2]
    assert info["column_labels"] == ["3 NFE, #1", "3 NFE, #2"]
    assert info["row_captions"] == ["a red circle  (seed 0)", "a tall house  (seed 1)"]
    left, top, _, _ = info["cells"][0][0]
    assert (pixels[:top] < 128).any()  # the column labels are drawn above the first row
    below = info["cells"][1][0][1] - 4
    assert (pixels[top + 64:below, :] < 128).any()  # and the first caption under it
    assert grid_cell(out, 1, 1).size == (48, 96)
    with pytest.raises(ValueError, match="--width 50 is not a positive multiple of 16"):
        main(["generate", "--base", str(tiny_flux_dir), "--adapter", str(setup[2]), "--prompt", "x",
              "--width", "50", "--out", str(out)])
    prompts.write_text('{"text": "no prompt key"}\n')
    with pytest.raises(ValueError, match=f"{prompts}:1: expected an object with a string 'prompt'"):
        main(["generate", "--base", str(tiny_flux_dir), "--adapter", str(setup[2]), "--prompts-file", str(prompts),
              "--out", str(out)])


def test_adapter_records_and_defaults_to_what_it_was_trained_with(setup, tiny_flux_dir, recwarn):
    _, run, adapter = setup
    state = json.loads(next((run / "checkpoints").glob("iter_*/state.json")).read_text())
    config = AdapterConfig.load(adapter / CONFIG_FILE)
    assert config.max_sequence_length == state["trained_with"]["max_sequence_length"] == 32
    assert [list(size) for size in config.resolutions] == state["trained_with"]["resolutions"]
    height, width = config.resolutions[0]

    pipe = arcflux(tiny_flux_dir, adapter)
    recwarn.clear()
    default = pipe("a red circle", generator=torch.Generator().manual_seed(0), output_type="pt").images
    explicit = pipe("a red circle", height=height, width=width, max_sequence_length=32, num_inference_steps=2,
                    guidance_scale=config.guidance, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert default.shape[-2:] == (height, width) and not recwarn.list
    torch.testing.assert_close(default, explicit, rtol=0, atol=0)

    for _ in range(2):  # outside the training settings: one warning per setting, however many calls
        pipe("a red circle", height=32, width=32, max_sequence_length=64, num_inference_steps=3, output_type="pt")
    messages = sorted(str(w.message) for w in recwarn.list)
    assert len(messages) == 3
    assert "32x32 is not a size it was trained on" in messages[0]
    assert "max_sequence_length=64 differs from the trained max_sequence_length=32" in messages[1]
    assert "nfe=3 differs from the trained nfe=2" in messages[2]


def test_format_1_adapter_still_loads(setup, tiny_flux_dir, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(setup[2], old)
    values = json.loads((old / CONFIG_FILE).read_text())
    del values["max_sequence_length"], values["resolutions"]
    (old / CONFIG_FILE).write_text(json.dumps({**values, "format_version": 1}))
    pipe = arcflux(tiny_flux_dir)
    with pytest.warns(UserWarning, match=r"\(format 1\) does not record the text length and image sizes"):
        config = pipe.load_arcflow_adapter(old)
    assert config.max_sequence_length is None and config.default_size is None
    (old / CONFIG_FILE).write_text(json.dumps({**values, "format_version": 2}))  # format 2 must record them
    with pytest.raises(ValueError, match="invalid adapter config value.*max_sequence_length=None"):
        AdapterConfig.load(old / CONFIG_FILE)
    (old / CONFIG_FILE).write_text(json.dumps({**values, "resolutions": [[64]], "max_sequence_length": 32}))
    with pytest.raises(ValueError, match="key 'resolutions' must be a list of \\[height, width\\] integer pairs"):
        AdapterConfig.load(old / CONFIG_FILE)
