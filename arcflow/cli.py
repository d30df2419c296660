"""Command line: ``arcflow {train,sample,export,generate,eval,cache,tiny,demo}``; ``tools/*.py`` call into here."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import transformers
from mmengine.config import DictAction
from torch.distributed.elastic.multiprocessing.errors import record

from arcflow.config import RunConfig, load_config, resolve_dirs
from arcflow.distributed import destroy_distributed, init_distributed
from arcflow.inference.commands import add_export_arguments, add_generate_arguments, run_export, run_generate

DEMO_CONFIG = "configs/demo/teacher_arcflux_2nfe.py"
TINY_CONFIG = "configs/demo/arcflux_tiny_2nfe.py"
DEMO_SCENES = 64
"""Held-out scenes the demo scores its student on (``benchmarks/distill_table.py`` uses 256)."""


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="run config (Python file with _base_ inheritance)")
    parser.add_argument("--work-dir", help="put everything of this run (logs, checkpoints, samples) here")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, default={},
                        help="override config keys, e.g. optimizer.lr=5e-5 train_cfg.batch_size=2")
    parser.add_argument("--launcher", choices=["none", "pytorch"], default="none",
                        help="'pytorch': started by torchrun")
    parser.add_argument("--seed", type=int, help="overrides train_cfg.seed")
    parser.add_argument("--diff_seed", action="store_true", help="give each rank its own seed (seed + rank)")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    options = dict(args.cfg_options or {})
    if getattr(args, "seed", None) is not None:
        options["train_cfg.seed"] = args.seed
    return resolve_dirs(load_config(args.config, options), args.work_dir)


@record
def run_train(args: argparse.Namespace) -> RunConfig:
    """Train on this process's rank; a failure is reported with the rank before the job stops."""
    from arcflow.training.trainer import Trainer

    cfg = config_from_args(args)
    env = init_distributed(args.launcher)
    try:
        Trainer(cfg, env, seed_offset=env.rank if args.diff_seed else 0).fit()
    except BaseException as err:
        if isinstance(err, Exception):
            print(f"[arcflow] rank {env.rank}/{env.world_size} failed: {type(err).__name__}: {err}",
                  file=sys.stderr, flush=True)
        destroy_distributed(graceful=False)
        raise
    destroy_distributed()
    return cfg


def run_sample(args: argparse.Namespace) -> None:
    from arcflow.inference.student import generate

    cfg = resolve_dirs(load_config(args.config, dict(args.cfg_options or {})), None)
    out = generate(cfg, args.ckpt, args.prompt, args.out, nfe=args.nfe, height=args.height, width=args.width,
                   seed=args.seed, device=init_distributed("none").device)
    print(f"wrote {out}")


def run_tiny(args: argparse.Namespace) -> None:
    from arcflow.models import get_family

    print(f"wrote {get_family(args.family).make_tiny(args.out_dir, args.seed)}")


def run_demo(args: argparse.Namespace) -> None:
    """Distil the demo teacher and print how close the 2-NFE student gets, and whether it follows prompts.

    The default teacher is the trained synthetic-scenes model in ``assets/demo_teacher``; with
    ``--config configs/demo/arcflux_tiny_2nfe.py`` a tiny random model of the config's family is
    made if absent.
    """
    from arcflow.models import get_family

    cfg_options = dict(args.cfg_options or {})
    probe = load_config(args.config, cfg_options)
    if not Path(probe.model.pretrained, "model_index.json").is_file():
        print(f"making the tiny {probe.model.backbone} model in {probe.model.pretrained}")
        get_family(probe.model.backbone).make_tiny(probe.model.pretrained, 0)
    train_args = argparse.Namespace(config=args.config, work_dir=args.work_dir, cfg_options=cfg_options,
                                    launcher="none", seed=None, diff_seed=False)
    cfg = run_train(train_args)
    val_metrics = Path(cfg.work_dir) / "val_metrics.jsonl"
    print(alignment_table(val_metrics) if val_metrics.is_file() else "no validation ran (eval_interval=0)")
    if Path(cfg.model.pretrained, "training.json").is_file():  # a scenes teacher (tools/train_demo_teacher.py)
        print(scene_table(cfg))


def scene_table(cfg: RunConfig) -> str:
    """The distillation table on held-out scenes for this run's EMA student at its training NFE."""
    from arcflow.demo.scene_eval import SceneBench, markdown_table
    from arcflow.inference.student import load_ema_student

    backbone, text_encoder, vae = load_ema_student(cfg, cfg.checkpoint_dir, init_distributed("none").device)
    bench = SceneBench(backbone, text_encoder, vae, DEMO_SCENES, cfg.data.val.height, cfg.data.val.width,
                       cfg.distill.shift)
    rows = bench.teacher_rows()
    rows.append(bench.student_row(f"arcflow_student_{cfg.distill.nfe}nfe", backbone, cfg.distill.nfe,
                                  cfg.distill.timestep_ratio))
    return markdown_table(rows, f"{DEMO_SCENES} scenes; benchmarks/distill_table.py gives the full table")


EVAL_OPTIONS = {"prompts": "eval_cfg.prompts", "num_prompts": "eval_cfg.num_prompts",
                "teacher_steps": "eval_cfg.teacher_steps", "real_images": "eval_cfg.real_images",
                "seed": "eval_cfg.seed", "batch_size": "eval_cfg.batch_size"}


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="the run config of the student (its model, sampler and eval_cfg)")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--ckpt", help="a training checkpoint, or a run dir (its latest): the EMA student")
    what.add_argument("--adapter", help="an exported adapter folder (arcflow export)")
    what.add_argument("--baseline-steps", type=int, help="evaluate the teacher's own N-step Euler sampler instead")
    parser.add_argument("--prompts", help="prompt set: hub dataset id or local file (default: eval_cfg.prompts)")
    parser.add_argument("--num-prompts", type=int, help="the first N prompts of the set")
    parser.add_argument("--nfe", type=int, help="student evaluations per image (default: the student's)")
    parser.add_argument("--teacher-steps", type=int, help="steps of the teacher's reference sampler (default: 50)")
    parser.add_argument("--real-images", help="folder of real images or .npz of Inception mu/sigma, for fid_real")
    parser.add_argument("--seed", type=int, help="noise seed (default: eval_cfg.seed)")
    parser.add_argument("--batch-size", type=int, help="images per generator forward")
    parser.add_argument("--download-weights", action="store_true",
                        help="let the metric libraries download weights this machine lacks")
    parser.add_argument("--work-dir", help="default: work_dirs/{config name}/eval_{sampler}")
    parser.add_argument("--launcher", choices=["none", "pytorch"], default="none",
                        help="'pytorch': started by torchrun")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, default={},
                        help="override config keys, e.g. eval_cfg.clip_model=ViT-B-32")


@record
def run_eval(args: argparse.Namespace) -> dict | None:
    """Evaluate a student (or a teacher baseline) with the protocol of arcflow.evaluation on every rank."""
    from arcflow.evaluation.protocol import evaluate, plan_candidate

    options = dict(args.cfg_options or {})
    options.update({key: getattr(args, name) for name, key in EVAL_OPTIONS.items() if getattr(args, name) is not None})
    if args.download_weights:
        options["eval_cfg.download_weights"] = True
    cfg = load_config(args.config, options)
    env = init_distributed(args.launcher)
    try:
        candidate, load = plan_candidate(cfg, env.device, ckpt=args.ckpt, adapter=args.adapter,
                                         baseline_steps=args.baseline_steps, nfe=args.nfe)
        work_dir = Path(args.work_dir or Path("work_dirs") / cfg.name / f"eval_{candidate.name}")
        command = shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
        result = evaluate(cfg, env, candidate, load, work_dir, command=command)
    except BaseException as err:
        if isinstance(err, Exception):
            print(f"[arcflow] rank {env.rank}/{env.world_size} failed: {type(err).__name__}: {err}",
                  file=sys.stderr, flush=True)
        destroy_distributed(graceful=False)
        raise
    destroy_distributed()
    return result


def run_cache(args: argparse.Namespace) -> None:
    """``arcflow cache verify CONFIG``: check every shard of the config's cache against its manifest."""
    from arcflow.data.embedding_cache import verify_cache

    problems = verify_cache(load_config(args.config, dict(args.cfg_options or {})).data.data_root)
    if problems:
        raise SystemExit("\n".join(["cache verify FAILED:", *problems]))


def alignment_table(val_metrics: Path) -> str:
    """Markdown table: the student's alignment at the first and last validation, and the teacher's few-step Euler."""
    records = [json.loads(line) for line in val_metrics.read_text().splitlines() if line.strip()]
    first, last = records[0], records[-1]
    names = sorted({key.split("/")[0] for key in last if "/" in key})
    lines = ["| sampler | iteration | latent MSE vs teacher (lower is better) | PSNR dB vs teacher |",
             "| --- | --- | --- | --- |"]
    for name in names:
        rows = [first, last] if name.startswith("student") else [last]
        for row in rows:
            lines.append(f"| {name} | {row['iter']} | {row[name + '/latent_mse']:.5f} "
                         f"| {row[name + '/psnr']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="arcflow", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="distil a teacher into an ArcFlow student")
    add_train_arguments(train)
    train.set_defaults(func=run_train)

    sample = commands.add_parser("sample", help="generate from a training checkpoint (EMA weights)")
    sample.add_argument("config")
    sample.add_argument("--ckpt", required=True, help="an iter_* checkpoint, or a run dir (its latest)")
    sample.add_argument("--prompt", nargs="+", required=True)
    sample.add_argument("--nfe", type=int, help="student evaluations (default: distill.nfe of the config)")
    sample.add_argument("--height", type=int, help="default: the checkpoint's most frequent training height")
    sample.add_argument("--width", type=int, help="default: the checkpoint's most frequent training width")
    sample.add_argument("--seed", type=int, default=0, help="prompt i uses seed + i")
    sample.add_argument("--out", required=True)
    sample.add_argument("--cfg-options", nargs="+", action=DictAction, default={})
    sample.set_defaults(func=run_sample)

    tiny = commands.add_parser("tiny", help="write a tiny random model of a family as a diffusers pipeline folder")
    tiny.add_argument("out_dir")
    tiny.add_argument("--family", default="flux", help="model family (model.backbone), e.g. flux")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=run_tiny)
    tiny_flux = commands.add_parser("tiny-flux", help="the same as: tiny OUT_DIR --family flux")
    tiny_flux.add_argument("out_dir")
    tiny_flux.add_argument("--seed", type=int, default=0)
    tiny_flux.set_defaults(func=run_tiny, family="flux")

    demo = commands.add_parser("demo", help="distil the shipped scenes teacher on this machine and print the tables")
    demo.add_argument("--config", default=DEMO_CONFIG)
    demo.add_argument("--work-dir")
    demo.add_argument("--cfg-options", nargs="+", action=DictAction, default={})
    demo.set_defaults(func=run_demo)

    export = commands.add_parser("export", help="export a checkpoint's EMA student as a diffusers adapter folder")
    add_export_arguments(export)
    export.set_defaults(func=run_export)

    generate = commands.add_parser("generate", help="generate with an exported adapter on its base model")
    add_generate_arguments(generate)
    generate.set_defaults(func=run_generate)

    evaluation = commands.add_parser("eval", help="score a student against its teacher: FID-T, pFID, CLIP, "
                                     "HPSv2, LPIPS, alignment, throughput (metrics.json)")
    add_eval_arguments(evaluation)
    evaluation.set_defaults(func=run_eval)

    cache = commands.add_parser("cache", help="the prompt-embedding cache: 'verify CONFIG' checks every shard")
    cache.add_argument("action", choices=["verify"])
    cache.add_argument("config")
    cache.add_argument("--cfg-options", nargs="+", action=DictAction, default={})
    cache.set_defaults(func=run_cache)

    args = parser.parse_args(argv)
    # Per-file "Loading weights" bars of transformers would bury the training progress bar.
    transformers.utils.logging.disable_progress_bar()
    args.func(args)


if __name__ == "__main__":
    main()
