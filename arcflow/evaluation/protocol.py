"""The evaluation protocol: generate the student's and the teacher's images from the same noise, then score them.

    arcflow eval CONFIG --ckpt DIR [--prompts NAME_OR_FILE] [--num-prompts N] [--nfe N] [--work-dir DIR]
    torchrun --nproc_per_node=8 tools/test.py CONFIG --ckpt DIR --launcher pytorch

1. Prompts (a hub prompt set or any local file, as training reads them) become :class:`EvalItem`s;
   rank r takes items r, r + W, r + 2W, ... Each item's noise depends only on (seed, prompt, size,
   occurrence), so the images do not depend on the number of ranks or the batch size.
2. The teacher's reference images (its own sampler: the family's step count, the config's guidance)
   go to the shared teacher store under a key of (model, sampler, noise seed); the candidate's
   (the student at n NFE, or a teacher baseline) to ``WORK_DIR/images/``. Each image is written
   as it is made; a rerun generates only what is missing.
3. Every rank scores its own images in batches on its device; rank 0 reduces all rows and writes
   ``metrics.json`` (flat name -> number or null, plus ``unavailable``), ``table.md``, ``grid.png``
   (teacher | candidate, the first prompts) and ``run.json`` (command, commit, sampler, timings).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm import tqdm

from arcflow.config import PromptsConfig, RunConfig, torch_dtype
from arcflow.data.prompt_sources import load_prompt_table
from arcflow.distributed import DistEnv
from arcflow.evaluation.report import STANDARD_METRICS, markdown_table, write_outputs
from arcflow.evaluation.store import EvalItem, ImageStore, make_items, noise_for, store_key_folder
from arcflow.images import to_uint8
from arcflow.method.sampling import sample_student, sample_teacher
from arcflow.metrics.suite import GROUP_NAMES, MetricSuite, Pairs
from arcflow.models import get_family, text_encoder_type
from arcflow.models.adapter import CONFIG_FILE, AdapterConfig, adapter_file
from arcflow.models.base import Backbone, Conditioning

log = logging.getLogger("arcflow")
Sampler = Callable[[Tensor, Conditioning], Tensor]


@dataclass(frozen=True)
class Candidate:
    """What is scored against the teacher's reference: the student at ``steps`` NFE, or the teacher's Euler."""

    kind: str
    steps: int
    source: dict[str, Any]
    """Where its weights come from (checkpoint, adapter or the base model), for its folder's key."""

    @property
    def name(self) -> str:
        return f"student_{self.steps}nfe" if self.kind == "student" else f"teacher_{self.steps}step"

    @property
    def folder(self) -> str:
        return "student" if self.kind == "student" else self.name


@dataclass
class Generator:
    """A loaded model (teacher and student share it), its text encoder and VAE, and how to sample it."""

    backbone: Backbone
    text_encoder: nn.Module
    vae: nn.Module
    shift: float
    timestep_ratio: float

    def sampler(self, kind: str, steps: int) -> Sampler:
        if kind == "student":
            return lambda z, c: sample_student(self.backbone, z, c, steps, self.shift, self.timestep_ratio)
        return lambda z, c: sample_teacher(self.backbone, z, c, steps, self.shift)


def load_items(cfg: RunConfig) -> list[EvalItem]:
    """The evaluation prompts of ``eval_cfg`` (checked before any model is loaded)."""
    ecfg = cfg.eval_cfg
    split = PromptsConfig(source=ecfg.prompts, split=ecfg.split, height=ecfg.height, width=ecfg.width,
                          max_size=ecfg.num_prompts)
    table = load_prompt_table(split, key="eval_cfg")
    return make_items([(table.texts[i].as_py(), int(table.heights[i]), int(table.widths[i]))
                       for i in range(len(table))])


def model_identity(pretrained: str) -> dict[str, Any]:
    """What names the teacher: a hub id as given; a local folder by its path, transformer config and weight sizes."""
    path = Path(pretrained)
    if not path.is_dir():
        return {"pretrained": pretrained}
    transformer = path / "transformer"
    sizes = {p.name: p.stat().st_size for p in sorted(transformer.glob("*.safetensors"))}
    config_file = transformer / "config.json"
    config = config_file.read_text(encoding="utf-8") if config_file.is_file() else ""
    return {"pretrained": str(path.resolve()), "transformer_config": json.loads(config or "{}"), "weights": sizes}


def teacher_key(cfg: RunConfig, steps: int, shift: float) -> dict[str, Any]:
    model = cfg.model
    encoder = model.text_encoder.max_sequence_length if model.text_encoder else 512
    return {"family": model.backbone, "sampler": f"euler{steps}", "steps": steps, "shift": shift,
            "guidance": model.guidance, "dtype": model.dtype, "seed": cfg.eval_cfg.seed,
            "text_encoder": [text_encoder_type(model), encoder], "model": model_identity(model.pretrained)}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _by_size(items: list[EvalItem], batch_size: int) -> list[list[EvalItem]]:
    groups: dict[tuple[int, int], list[EvalItem]] = {}
    for item in items:
        groups.setdefault((item.height, item.width), []).append(item)
    return [group[i:i + batch_size] for group in groups.values() for i in range(0, len(group), batch_size)]


def generate_missing(items: list[EvalItem], store: ImageStore, name_of: Callable[[EvalItem], str], sampler: Sampler,
                     gen: Generator, seed: int, batch_size: int, env: DistEnv, desc: str) -> dict[str, Any] | None:
    """Sample and store every item not yet in ``store``; return this session's timing (None if nothing was made)."""
    pending = [item for item in items if not store.has(name_of(item))]
    if not pending:
        return None
    device = env.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timings = []
    with tqdm(total=len(pending), desc=desc, unit="image", disable=not env.is_main, dynamic_ncols=True) as bar:
        for batch in _by_size(pending, batch_size):
            shape = gen.backbone.latent_shape(batch[0].height, batch[0].width)
            noise = torch.stack([noise_for(item, seed, shape) for item in batch]).to(device)
            _sync(device)
            start = time.perf_counter()
            with torch.no_grad():
                cond = {k: v.to(device) for k, v in gen.text_encoder.encode([item.prompt for item in batch]).items()}
                latents = sampler(noise, cond)
                images = gen.backbone.decode(gen.vae, latents)
            _sync(device)
            timings.append((len(batch), time.perf_counter() - start))
            for item, image, latent in zip(batch, to_uint8(images), latents.float().cpu()):
                store.write(name_of(item), image, latent)
            bar.update(len(batch))
    # The first batch carries one-off costs (kernel selection, caches); leave it out when there are others.
    steady = timings[1:] or timings
    return {"rank": env.rank, "device": device_name(device), "images": sum(n for n, _ in steady),
            "seconds": sum(s for _, s in steady), "total_images": sum(n for n, _ in timings),
            "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            "time": time.time()}


def record_timing(folder: Path, record: dict[str, Any] | None, rank: int) -> None:
    if record is not None:
        with open(folder / f"throughput-rank{rank}.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def read_throughput(folder: Path, device: str) -> tuple[float | None, float | None, str]:
    """(images/s per device, peak GB, reason if none) from every timing recorded in ``folder`` on ``device``."""
    records = [json.loads(line) for path in sorted(folder.glob("throughput-rank*.jsonl"))
               for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    here = [r for r in records if r["device"] == device and r["seconds"] > 0]
    if not here:
        elsewhere = sorted({r["device"] for r in records})
        reason = f"images were made on {', '.join(elsewhere)}, not on {device}" if elsewhere else "no timing recorded"
        return None, None, reason
    peaks = [r["peak_memory_gb"] for r in here if r["peak_memory_gb"] is not None]
    rate = sum(r["images"] for r in here) / sum(r["seconds"] for r in here)
    return rate, (max(peaks) if peaks else None), ""


def _load_pairs(batch: list[EvalItem], candidate: ImageStore, reference: ImageStore, candidate_name: Callable,
                device: torch.device) -> Pairs:
    cand = [candidate.read(candidate_name(item)) for item in batch]
    ref = [reference.read(item.key) for item in batch]
    stack = lambda parts, i: torch.stack([p[i] for p in parts]).to(device)  # noqa: E731
    return Pairs([item.prompt for item in batch], stack(cand, 0), stack(ref, 0), stack(cand, 1), stack(ref, 1))


def score_shard(items: list[EvalItem], suite: MetricSuite, candidate: ImageStore, reference: ImageStore,
                batch_size: int, env: DistEnv) -> dict[str, Tensor]:
    with tqdm(total=len(items), desc="metrics", unit="image", disable=not env.is_main, dynamic_ncols=True) as bar:
        for batch in _by_size(items, batch_size):
            suite.update(_load_pairs(batch, candidate, reference, lambda item: item.name, env.device))
            bar.update(len(batch))
    return suite.state()


def commit_of(path: Path) -> str:
    """HEAD of the checkout holding ``path``, marked ``-dirty`` when tracked files differ from it."""
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=path, capture_output=True, text=True, check=False)
        return done.stdout.strip() if done.returncode == 0 else ""
    head = git("rev-parse", "HEAD")
    return (head + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")) if head else "unknown"


def evaluate(cfg: RunConfig, env: DistEnv, candidate: Candidate, load: Callable[[], Generator], work_dir: Path,
             command: str = "") -> dict[str, Any] | None:
    """Run the protocol on every rank; rank 0 returns the metrics (others None).

    ``load`` builds the model only after the prompts and folders have been checked.
    """
    start = time.perf_counter()
    ecfg = cfg.eval_cfg
    items = load_items(cfg)
    mine = items[env.rank::env.world_size]
    family = get_family(cfg.model.backbone)
    reference_steps = ecfg.teacher_steps or family.eval_teacher_steps
    gen = load()
    key = teacher_key(cfg, reference_steps, gen.shift)
    reference = ImageStore(store_key_folder(ecfg.teacher_store, key), key if env.is_main else None)
    images_dir = work_dir / "images"
    candidate_key = {"candidate": candidate.name, **candidate.source, "seed": ecfg.seed,
                     "teacher": str(reference.root)}
    env.barrier()  # rank 0 has checked (or written) the store keys before anyone writes images
    store = ImageStore(images_dir / candidate.folder, candidate_key if env.is_main else None)
    env.barrier()

    made = generate_missing(mine, reference, lambda item: item.key, gen.sampler("teacher", reference_steps), gen,
                            ecfg.seed, ecfg.batch_size, env, f"teacher {reference_steps} steps")
    record_timing(reference.root, made, env.rank)
    made = generate_missing(mine, store, lambda item: item.name, gen.sampler(candidate.kind, candidate.steps), gen,
                            ecfg.seed, ecfg.batch_size, env, candidate.name)
    record_timing(store.root, made, env.rank)
    del gen  # the metric networks get the memory of the generator
    if env.device.type == "cuda":
        torch.cuda.empty_cache()
    env.barrier()

    suite = MetricSuite.build(ecfg, ecfg.metrics, env.device)
    parts = work_dir / "metric_parts"
    parts.mkdir(parents=True, exist_ok=True)
    state = score_shard(mine, suite, store, reference, ecfg.feature_batch_size, env)
    part = parts / f"rank{env.rank}-of-{env.world_size}.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(part))
    env.barrier()
    if not env.is_main:
        return None

    merged: dict[str, list[Tensor]] = {}
    for rank in range(env.world_size):
        for k, v in load_file(str(parts / f"rank{rank}-of-{env.world_size}.safetensors")).items():
            merged.setdefault(k, []).append(v)
    values, reasons = suite.compute({k: torch.cat(v) for k, v in merged.items()})
    device = device_name(env.device)
    for label, folder in (("student", store.root), ("teacher", reference.root)):
        rate, peak, why = read_throughput(folder, device)
        values[f"images_per_s_{label}"], values[f"peak_memory_gb_{label}"] = rate, peak
        if rate is None:
            reasons[f"images_per_s_{label}"] = why
        if peak is None:
            reasons[f"peak_memory_gb_{label}"] = why or "peak memory is measured on CUDA devices only"
    if "prompt_accuracy" not in values:
        reasons["prompt_accuracy"] = ("no semantic metric for these prompts: eval_cfg.hooks names none that gives "
                                      "prompt_accuracy (the demo's scene detector does)")
    for group in set(GROUP_NAMES) - set(ecfg.metrics):
        reasons.update(dict.fromkeys(GROUP_NAMES[group], f"not asked for (eval_cfg.metrics has no '{group}')"))
    for name in STANDARD_METRICS:
        values.setdefault(name, None)
    run = {"command": command, "commit": commit_of(Path.cwd()), "config": cfg.name, "candidate": candidate.name,
           "candidate_source": candidate.source, "reference": f"teacher_{reference_steps}step",
           "teacher_store": str(reference.root), "prompts": ecfg.prompts, "num_prompts": len(items),
           "world_size": env.world_size, "device": device, "seed": ecfg.seed,
           "wall_seconds": round(time.perf_counter() - start, 1), "eval_cfg": dataclasses.asdict(ecfg)}
    write_outputs(work_dir, values, reasons, run, items, store, reference, ecfg.grid_prompts)
    print(markdown_table(values, reasons, run))
    return {"metrics": values, "unavailable": reasons, "run": run}



def plan_candidate(cfg: RunConfig, device: torch.device, ckpt: str | None = None, adapter: str | None = None,
                   baseline_steps: int | None = None, nfe: int | None = None
                   ) -> tuple[Candidate, Callable[[], Generator]]:
    """What to evaluate and how to load it, checked (paths, NFE) before any weights are read."""
    from arcflow.inference.student import load_adapter_student, load_ema_student
    from arcflow.models import build_backbone, build_text_encoder
    from arcflow.training.checkpoint import resolve_checkpoint

    if sum(x is not None for x in (ckpt, adapter, baseline_steps)) != 1:
        raise ValueError("give exactly one of --ckpt DIR, --adapter DIR or --baseline-steps N")
    distill = cfg.distill
    if baseline_steps is not None:
        if baseline_steps < 1:
            raise ValueError(f"--baseline-steps must be >= 1, got {baseline_steps}")

        def load_base() -> Generator:
            backbone = build_backbone(cfg.model, device)
            backbone.eval()
            vae = backbone.load_vae(cfg.model.pretrained, torch_dtype(cfg.model.dtype)).to(device)
            return Generator(backbone, build_text_encoder(cfg.model).to(device), vae, distill.shift,
                             distill.timestep_ratio)

        return Candidate("teacher", baseline_steps, {"base": model_identity(cfg.model.pretrained)}), load_base
    steps = nfe or cfg.eval_cfg.nfe
    if ckpt is not None:
        path = resolve_checkpoint(ckpt)
        steps = steps or distill.nfe
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))

        def load_ckpt() -> Generator:
            backbone, text_encoder, vae = load_ema_student(cfg, path, device)
            return Generator(backbone, text_encoder, vae, distill.shift, distill.timestep_ratio)

        source = {"checkpoint": str(path.resolve()), "iteration": state.get("iteration")}
        candidate, load = Candidate("student", steps, source), load_ckpt
    else:
        config = AdapterConfig.load(adapter_file(adapter, CONFIG_FILE))
        steps = steps or config.nfe

        def load_adapter() -> Generator:
            backbone, text_encoder, vae, adapter_config = load_adapter_student(cfg, adapter, device)
            return Generator(backbone, text_encoder, vae, adapter_config.shift, adapter_config.timestep_ratio)

        source = {"adapter": str(Path(adapter).resolve()), "iteration": config.iteration}
        candidate, load = Candidate("student", steps, source), load_adapter
    if steps < 2:
        raise ValueError(f"--nfe must be >= 2 for the ArcFlow student, got {steps}")
    return candidate, load
