"""The demo's evaluation table: ``arcflow eval`` on the shipped teacher, its ArcFlow students and baselines.

Trains (or resumes) two students of the demo recipe with ``tools/train.py`` — ArcFlow K=16 and the K=1
ablation (one mode: the straight "linear shortcut") — then runs ``arcflow eval`` on each and on the
teacher's own Euler sampler at 2, 4, 8 and 50 steps, all against the teacher's 50-step images from the
same noise. Every row is one ``arcflow eval`` command, recorded with its wall time.

Run from the repository root::

    python benchmarks/eval_demo_table.py [--num-prompts 64]

Runs go to ``work_dirs/eval_demo_table/``; the table to ``docs/results/eval_demo_table.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/demo/teacher_arcflux_2nfe.py"
STUDENTS = {"arcflow_k16": (), "linear_k1": ("model.num_modes=1",)}
"""Student name -> its config overrides of the demo recipe."""
BASELINE_STEPS = (2, 4, 8, 50)
COLUMNS = ("prompt_accuracy", "latent_mse", "psnr", "lpips", "fid_teacher", "pfid_teacher", "clip_score",
           "images_per_s_student")


def timed(command: list[str]) -> float:
    """Run one command from the repository root (its output shown), return its wall time in seconds."""
    print("$", shlex.join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-prompts", type=int, default=64, help="held-out scene captions to score")
    parser.add_argument("--out", default="docs/results/eval_demo_table", help="table path, without suffix")
    args = parser.parse_args()
    runs = Path("work_dirs/eval_demo_table")
    rows = []
    for name, options in STUDENTS.items():
        train = [sys.executable, "tools/train.py", CONFIG, "--work-dir", str(runs / name)]
        train_seconds = timed(train + (["--cfg-options", *options] if options else []))
        evaluate = ["arcflow", "eval", CONFIG, "--ckpt", str(runs / name / "checkpoints"),
                    "--num-prompts", str(args.num_prompts), "--work-dir", str(runs / name / "eval")]
        seconds = timed(evaluate + (["--cfg-options", *options] if options else []))
        rows.append({"sampler": f"{name} student", "nfe": 2, "command": shlex.join(evaluate), "seconds": seconds,
                     "train_seconds": train_seconds, **json.loads((runs / name / "eval" / "metrics.json").read_text())})
    for steps in BASELINE_STEPS:
        evaluate = ["arcflow", "eval", CONFIG, "--baseline-steps", str(steps), "--num-prompts", str(args.num_prompts),
                    "--work-dir", str(runs / f"teacher_{steps}step")]
        seconds = timed(evaluate)
        rows.append({"sampler": f"teacher Euler {steps}-step", "nfe": steps, "command": shlex.join(evaluate),
                     "seconds": seconds, **json.loads((runs / f"teacher_{steps}step" / "metrics.json").read_text())})

    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    header = ["sampler", "NFE", *COLUMNS, "eval s"]
    lines = [f"`arcflow eval` on {args.num_prompts} held-out demo prompts against the teacher's 50-step images "
             f"({machine}); null: unavailable on this machine (see metrics.json `unavailable`).", "",
             "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in rows:
        cells = [row["sampler"], str(row["nfe"])]
        cells += ["null" if row.get(key) is None else f"{row[key]:.4g}" for key in COLUMNS]
        cells.append(f"{row['seconds']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    out = ROOT / args.out
    out.with_suffix(".json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
