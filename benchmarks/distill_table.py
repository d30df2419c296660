"""Does ArcFlow distil the shipped demo teacher? The table of docs/results/distill_table.md.

Distils ``assets/demo_teacher`` (a trained FLUX-architecture model, see
``tools/train_demo_teacher.py``) three ways with ``tools/train.py`` — ArcFlow K=16 at 2 and
4 NFE, and the same recipe with K=1 (one mode, no rates: the straight "linear shortcut")
at 2 NFE — then scores every sampler on a fixed held-out set of scenes (captions and
noises) against the teacher's 128-step Euler samples: latent MSE, image PSNR, and the
fraction of samples whose detected colour and shape match the caption.

Run from the repository root::

    python benchmarks/distill_table.py [--num-prompts 256] [--threads 2] [--skip-train]

Training runs go to ``work_dirs/distill_table/{name}`` and resume if present; results to
``docs/results/distill_table.{json,md}`` and ``distill_grid.png`` (one column per row of the
table, the first 8 held-out prompts).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: import this checkout's arcflow, not an installed one

from arcflow.config import load_config, resolve_dirs
from arcflow.demo.scene_eval import NOISE_SEED, REFERENCE_STEPS, SceneBench, markdown_table
from arcflow.demo.teacher_training import EVAL_SEED
from arcflow.images import save_grid
from arcflow.inference.student import load_ema_student

CONFIG = "configs/demo/teacher_arcflux_2nfe.py"
GRID_PROMPTS = 8


@dataclass(frozen=True)
class StudentRun:
    """One distillation: a name, its config overrides, and the NFE it is sampled at."""

    name: str
    options: tuple[str, ...]
    nfe: int


STUDENTS = (
    StudentRun("arcflow_k16_2nfe", (), 2),
    StudentRun("arcflow_k16_4nfe", ("distill.nfe=4", "val_cfg.nfe=[4]"), 4),
    StudentRun("linear_k1_2nfe", ("model.num_modes=1",), 2),
)


def _train_command(config: str, run: StudentRun) -> list[str]:
    command = [sys.executable, "tools/train.py", config, "--work-dir", f"work_dirs/distill_table/{run.name}"]
    return command + (["--cfg-options", *run.options] if run.options else [])


def _printable(command: list[str]) -> str:
    return " ".join(shlex.quote(Path(part).name if part == sys.executable else part) for part in command)


def _train(config: str, run: StudentRun, threads: int) -> float:
    """Distil with the user's own command (resumes, and is a no-op once finished); wall seconds."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    subprocess.run(_train_command(config, run), cwd=ROOT, env=env, check=True)
    return time.perf_counter() - start


def _commit() -> str:
    """HEAD, marked ``-dirty`` when the working tree differs from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()
    head = git("rev-parse", "HEAD") or "unknown"
    return head + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def evaluate(config: str, num_prompts: int, batch_size: int, device: torch.device
             ) -> tuple[list[dict[str, object]], dict[str, torch.Tensor]]:
    """Every row of the table; teacher rows use the first student's backbone with its adapters off."""
    cfgs = {run.name: resolve_dirs(load_config(config, _options(run)), f"work_dirs/distill_table/{run.name}")
            for run in STUDENTS}
    first = cfgs[STUDENTS[0].name]
    backbone, text_encoder, vae = load_ema_student(first, first.work_dir, device)
    bench = SceneBench(backbone, text_encoder, vae, num_prompts, first.data.val.height, first.data.val.width,
                       first.distill.shift, batch_size)
    rows = bench.teacher_rows()
    for run in STUDENTS:
        cfg = cfgs[run.name]
        student = backbone if run is STUDENTS[0] else load_ema_student(cfg, cfg.work_dir, device)[0]
        rows.append(bench.student_row(run.name, student, run.nfe, cfg.distill.timestep_ratio))
    return rows, bench.images


def _options(run: StudentRun) -> dict[str, object]:
    """``--cfg-options`` strings as the dict ``load_config`` takes (values parsed as JSON)."""
    return {key: json.loads(value) for key, value in (option.split("=", 1) for option in run.options)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=CONFIG)
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-train", action="store_true", help="only evaluate existing runs")
    parser.add_argument("--out", default="docs/results")
    args = parser.parse_args()
    os.chdir(ROOT)
    torch.set_num_threads(args.threads)
    command = _printable([sys.executable, *sys.argv])
    train_seconds = {run.name: None if args.skip_train else round(_train(args.config, run, args.threads), 1)
                     for run in STUDENTS}
    start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows, images = evaluate(args.config, args.num_prompts, args.batch_size, device)
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda" else
               f"{platform.machine()} CPU, {os.cpu_count()} cores") + f", torch {torch.__version__}"
    commit = _commit()
    by_name = {run.name: run for run in STUDENTS}
    for row in rows:
        run = by_name.get(row["name"])
        row["train_command"] = _printable(_train_command(args.config, run)) if run else None
        row["train_seconds"] = train_seconds.get(row["name"])
        row["command"], row["commit"] = command, commit
    record = {"machine": machine, "num_prompts": args.num_prompts, "eval_seed": EVAL_SEED, "noise_seed": NOISE_SEED,
              "reference": f"teacher_euler_{REFERENCE_STEPS}step", "eval_seconds": round(time.perf_counter() - start, 1),
              "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "distill_table.json").write_text(json.dumps(record, indent=1) + "\n")
    save_grid([[images[row["name"]][i] for row in rows] for i in range(min(GRID_PROMPTS, args.num_prompts))],
              out / "distill_grid.png")
    table = markdown_table(rows, machine)
    (out / "distill_table.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
