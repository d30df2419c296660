"""arcflow: distil a text-to-image flow model into a 2-step ArcFlow student, and sample it.

``tools/*.py`` call into here; ``arcflow COMMAND --help`` lists a command's options and their defaults."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import transformers
from mmengine.config import DictAction
from torch.distributed.elastic.multiprocessing.errors import record

from arcflow.config import ConfigError, RunConfig, load_config, resolve_dirs
from arcflow.data.cache_files import CacheError
from arcflow.distributed import destroy_distributed, init_distributed
from arcflow.inference.commands import add_export_arguments, add_generate_arguments, run_export, run_generate
from arcflow.models.hub import ModelUnavailable, report_once, reports_unavailable_model

REPO_ROOT = Path(__file__).resolve().parents[1]
"""The checkout this package runs from (installed with ``pip install -e .``): configs/ and assets/ are there."""
DEMO_CONFIG = "configs/demo/teacher_arcflux_2nfe.py"
TINY_CONFIG = "configs/demo/arcflux_tiny_2nfe.py"
DEMO_SCENES = 64
"""Held-out scenes the demo scores its student on (``benchmarks/distill_table.py`` uses 256)."""


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default: argparse's own value, or the help's words for None."""

    def __init__(self, prog: str, max_help_position: int = 30, width: int | None = None) -> None:
        super().__init__(prog, max_help_position=max_help_position, width=width)

    def add_argument(self, action: argparse.Action) -> None:
        """Make room for the longest command name too (argparse forgets their indentation), so each
        command's help stays on its line."""
        super().add_argument(action)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action._get_subactions():
                width = len(self._format_action_invocation(sub)) + self._current_indent + 2 * self._indent_increment
                self._action_max_length = max(self._action_max_length, width)

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if "default" in help_text or action.required or not action.option_strings or action.default is None \
                or action.default is argparse.SUPPRESS:
            return help_text
        if isinstance(action, argparse._StoreTrueAction):
            return f"{help_text} (default: off)"
        if action.default == {}:
            return f"{help_text} (default: none)"
        return f"{help_text} (default: %(default)s)"


class RawDescriptionHelpFormatter(argparse.RawDescriptionHelpFormatter, HelpFormatter):
    """:class:`HelpFormatter` keeping a description's own line breaks (a command shown as typed)."""


def cfg_options_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, default={}, metavar="KEY=VALUE",
                        help="override config keys, e.g. optimizer.lr=5e-5 train_cfg.batch_size=2")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="run config (Python file with _base_ inheritance)")
    parser.add_argument("--work-dir", help="put everything of this run (logs, checkpoints, samples) here "
                        "(default: work_dirs/{config name}, checkpoints in checkpoints/{config name})")
    cfg_options_argument(parser)
    parser.add_argument("--launcher", choices=["none", "pytorch"], default="none",
                        help="'pytorch': started by torchrun")
    parser.add_argument("--seed", type=int, help="overrides train_cfg.seed (default: the config's)")
    parser.add_argument("--diff_seed", action="store_true",
                        help="ranks draw different randomness: always so, since every draw follows the global "
                             "sample index; the run is the same with or without it")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    options = dict(args.cfg_options or {})
    if getattr(args, "seed", None) is not None:
        options["train_cfg.seed"] = args.seed
    try:
        return resolve_dirs(load_config(args.config, options), args.work_dir)
    except (ConfigError, FileNotFoundError) as err:  # the user's file or value: one line, no traceback
        raise SystemExit(f"arcflow: error: {err}") from None


def _cache_remedy(config: str) -> str:
    return (f"`arcflow cache verify {config}` lists every damaged file, and rerunning the cache command "
            "rebuilds exactly those; the run resumes from its last checkpoint")


@record
@reports_unavailable_model
def run_train(args: argparse.Namespace) -> RunConfig:
    """Train on this process's rank; a failure is reported with the rank before the job stops."""
    from arcflow.training.trainer import Trainer

    cfg = config_from_args(args)
    try:
        env = init_distributed(args.launcher)
    except RuntimeError as err:  # a launch that does not match --launcher: one line, before any work
        raise SystemExit(f"arcflow: error: {err}") from None
    trainer = None
    try:
        trainer = Trainer(cfg, env)
        trainer.fit()
    except CacheError as err:
        destroy_distributed(graceful=False)
        remedy = _cache_remedy(args.config)
        if trainer is None:  # before training every rank reads the same manifest, index and negative file
            report_once(f"{err} ({remedy})")
        # during training, a shard only this rank reads: said by this rank
        print(f"arcflow: error: rank {env.rank}/{env.world_size}: {err} ({remedy})", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    except BaseException as err:
        if isinstance(err, Exception) and not isinstance(err, ModelUnavailable):
            print(f"[arcflow] rank {env.rank}/{env.world_size} failed: {type(err).__name__}: {err}",
                  file=sys.stderr, flush=True)
        destroy_distributed(graceful=False)
        raise
    destroy_distributed()
    return cfg


@reports_unavailable_model
def run_sample(args: argparse.Namespace) -> None:
    """Sample a training checkpoint's EMA student with the trainer's own sampler; settings left out are the
    ones it was trained with (NFE, image size, text length)."""
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

    config, cfg_options = demo_inputs(args.config, dict(args.cfg_options or {}))
    probe = load_config(config, cfg_options)
    if not Path(probe.model.pretrained, "model_index.json").is_file():
        print(f"making the tiny {probe.model.backbone} model in {probe.model.pretrained}")
        get_family(probe.model.backbone).make_tiny(probe.model.pretrained, 0)
    train_args = argparse.Namespace(config=config, work_dir=args.work_dir, cfg_options=cfg_options,
                                    launcher="none", seed=None, diff_seed=False)
    cfg = run_train(train_args)
    val_metrics = Path(cfg.work_dir) / "val_metrics.jsonl"
    print(alignment_table(val_metrics) if val_metrics.is_file() else "no validation ran (eval_interval=0)")
    if Path(cfg.model.pretrained, "training.json").is_file():  # a scenes teacher (tools/train_demo_teacher.py)
        print(scene_table(cfg))


def _in_repository(path: str) -> str:
    """``path`` itself when it exists from here (or is absolute), else the repository's file of that name."""
    if not path or Path(path).is_absolute() or Path(path).exists():
        return path
    shipped = REPO_ROOT / path
    return str(shipped) if shipped.exists() else path


def demo_inputs(config: str, cfg_options: dict) -> tuple[str, dict]:
    """The demo from any directory: its config, teacher and prompt files are read from the repository when
    the current directory has no such paths; what the run writes stays under the current directory."""
    config = _in_repository(config)
    probe = load_config(config, cfg_options)
    inputs = {"model.pretrained": probe.model.pretrained, "data.source": probe.data.source,
              "data.train.source": probe.data.train.source, "data.val.source": probe.data.val.source}
    moved = {key: _in_repository(value) for key, value in inputs.items() if key not in cfg_options}
    return config, {**cfg_options, **{key: value for key, value in moved.items() if value != inputs[key]}}


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
    parser.add_argument("--num-prompts", type=int, help="the first N prompts of the set (default: eval_cfg.num_prompts)")
    parser.add_argument("--nfe", type=int, help="student evaluations per image (default: the student's)")
    parser.add_argument("--teacher-steps", type=int, help="steps of the teacher's reference sampler (default: 50)")
    parser.add_argument("--real-images", help="folder of real images or .npz of Inception mu/sigma, for fid_real "
                        "(default: eval_cfg.real_images)")
    parser.add_argument("--seed", type=int, help="noise seed (default: eval_cfg.seed)")
    parser.add_argument("--batch-size", type=int, help="images per generator forward (default: eval_cfg.batch_size)")
    parser.add_argument("--download-weights", action="store_true",
                        help="let the metric libraries download weights this machine lacks")
    parser.add_argument("--work-dir", help="default: work_dirs/{config name}/eval_{sampler}")
    parser.add_argument("--launcher", choices=["none", "pytorch"], default="none",
                        help="'pytorch': started by torchrun")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, default={},
                        help="override config keys, e.g. eval_cfg.clip_model=ViT-B-32")


@record
@reports_unavailable_model
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
        if isinstance(err, Exception) and not isinstance(err, ModelUnavailable):
            print(f"[arcflow] rank {env.rank}/{env.world_size} failed: {type(err).__name__}: {err}",
                  file=sys.stderr, flush=True)
        destroy_distributed(graceful=False)
        raise
    destroy_distributed()
    return result


def run_cache_verify(args: argparse.Namespace) -> None:
    """``arcflow cache verify CONFIG``: check every shard, the index and the negative prompt of the config's
    cache against their hashes; a rerun of ``arcflow cache build`` rebuilds exactly what fails."""
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


def add_sample_parser(commands: argparse._SubParsersAction) -> None:
    sample = commands.add_parser("sample", help="sample a training checkpoint's EMA student",
                                 description=run_sample.__doc__, formatter_class=HelpFormatter)
    sample.add_argument("config", help="the run config the checkpoint was trained with")
    sample.add_argument("--ckpt", required=True, help="an iter_* checkpoint, or a run dir (its latest)")
    sample.add_argument("--prompt", nargs="+", required=True, help="one or more prompts (one image each)")
    sample.add_argument("--nfe", type=int, help="student evaluations (default: distill.nfe of the config)")
    sample.add_argument("--height", type=int, help="default: the checkpoint's most frequent training height")
    sample.add_argument("--width", type=int, help="default: the checkpoint's most frequent training width")
    sample.add_argument("--seed", type=int, default=0, help="prompt i uses seed + i")
    sample.add_argument("--out", required=True, help="PNG to write (the images side by side)")
    cfg_options_argument(sample)
    sample.set_defaults(func=run_sample)


def add_tiny_parsers(commands: argparse._SubParsersAction) -> None:
    tiny = commands.add_parser("tiny", help="write a tiny random model of a family (diffusers layout)",
                               formatter_class=HelpFormatter)
    tiny.add_argument("out_dir", help="folder to write the diffusers pipeline to")
    tiny.add_argument("--family", default="flux", help="model family (model.backbone)")
    tiny.add_argument("--seed", type=int, default=0, help="of the random weights")
    tiny.set_defaults(func=run_tiny)
    tiny_flux = commands.add_parser("tiny-flux", help="the same as: tiny OUT_DIR --family flux",
                                    formatter_class=HelpFormatter)
    tiny_flux.add_argument("out_dir", help="folder to write the diffusers pipeline to")
    tiny_flux.add_argument("--seed", type=int, default=0, help="of the random weights")
    tiny_flux.set_defaults(func=run_tiny, family="flux")


def add_demo_parser(commands: argparse._SubParsersAction) -> None:
    demo = commands.add_parser("demo", help="distil the shipped demo teacher here and print the tables",
                               description=run_demo.__doc__, formatter_class=HelpFormatter)
    demo.add_argument("--config", default=DEMO_CONFIG, help="demo config (found in the repository from any "
                      "directory)")
    demo.add_argument("--work-dir", help="put everything of the run here (default: work_dirs/{config name}, "
                      "checkpoints in checkpoints/{config name}, under the current directory)")
    cfg_options_argument(demo)
    demo.set_defaults(func=run_demo)


@reports_unavailable_model
def run_cache_build(args: argparse.Namespace) -> None:
    """``arcflow cache build CONFIG --text-encoder FILE``: tools/cache_image_prompt_data.py (torchrun works too)."""
    from arcflow.data.cache_command import execute

    execute(args)


def add_cache_parser(commands: argparse._SubParsersAction) -> None:
    from arcflow.data.cache_command import __doc__ as build_doc
    from arcflow.data.cache_command import add_arguments

    cache = commands.add_parser("cache", help="the prompt-embedding cache: build CONFIG embeds the prompts, "
                                "verify CONFIG checks every file", formatter_class=HelpFormatter)
    actions = cache.add_subparsers(dest="action", required=True, metavar="ACTION", help="build or verify")
    build = actions.add_parser("build", help="embed the config's prompt set (tools/cache_image_prompt_data.py)",
                               description=build_doc, formatter_class=RawDescriptionHelpFormatter)
    add_arguments(build)
    build.set_defaults(func=run_cache_build)
    verify = actions.add_parser("verify", help="check every file of the config's cache against its hashes",
                                description=run_cache_verify.__doc__, formatter_class=HelpFormatter)
    verify.add_argument("config", help="run config: its data.data_root holds the cache")
    cfg_options_argument(verify)
    verify.set_defaults(func=run_cache_verify)


DEMO_ADAPTER = "adapters/arcflux-demo"
"""Where the README's export writes the demo's adapter."""


@reports_unavailable_model
def run_app(args: argparse.Namespace) -> None:
    """Serve a local web page (Gradio) to try the student against its teacher: prompt, seed, size, NFE,
    a student/teacher toggle, and how long each image took."""
    from arcflow.inference.app import serve

    if args.adapter == DEMO_ADAPTER and not Path(args.adapter).is_dir():
        raise SystemExit(f"no adapter at {DEMO_ADAPTER}: run `arcflow demo`, then export it (see the README: "
                         "python tools/export_arcflow_to_diffusers.py ...), or pass --adapter")
    serve(_in_repository(args.base), args.adapter, args.host, args.port, args.device, args.dtype)


def add_app_parser(commands: argparse._SubParsersAction) -> None:
    app = commands.add_parser("app", help="a local web page to try the student against its teacher",
                              description=run_app.__doc__, formatter_class=HelpFormatter)
    app.add_argument("--base", default="assets/demo_teacher", help="base model: hub id or diffusers folder")
    app.add_argument("--adapter", default=DEMO_ADAPTER, help="ArcFlow adapter folder (arcflow export) or hub id")
    app.add_argument("--host", default="127.0.0.1", help="address to serve on")
    app.add_argument("--port", type=int, default=7860, help="port to serve on")
    app.add_argument("--device", help="default: cuda if available, else cpu")
    app.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                     help="weights and compute (default: bfloat16 on CUDA, float32 on CPU)")
    app.set_defaults(func=run_app)


def build_parser() -> argparse.ArgumentParser:
    """``arcflow`` and its commands, one line of help each."""
    parser = argparse.ArgumentParser(prog="arcflow", description=__doc__, formatter_class=HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="distil a teacher into an ArcFlow student (tools/train.py)",
                                description=run_train.__doc__, formatter_class=HelpFormatter)
    add_train_arguments(train)
    train.set_defaults(func=run_train)
    add_sample_parser(commands)
    add_tiny_parsers(commands)
    add_demo_parser(commands)
    export = commands.add_parser("export", help="export a checkpoint's EMA student as an adapter folder",
                                 formatter_class=HelpFormatter)
    add_export_arguments(export)
    export.set_defaults(func=run_export)
    generate = commands.add_parser("generate", help="generate with an exported adapter on its base model",
                                   formatter_class=HelpFormatter)
    add_generate_arguments(generate)
    generate.set_defaults(func=run_generate)
    evaluation = commands.add_parser("eval", help="score a student against its teacher (metrics.json)",
                                     formatter_class=HelpFormatter)
    add_eval_arguments(evaluation)
    evaluation.set_defaults(func=run_eval)
    add_cache_parser(commands)
    add_app_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Per-file "Loading weights" bars of transformers would bury the training progress bar.
    transformers.utils.logging.disable_progress_bar()
    try:
        args.func(args)
    except ConfigError as err:
        raise SystemExit(f"arcflow: error: {err}") from None


if __name__ == "__main__":
    main()
