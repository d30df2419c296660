"""What an evaluation leaves in its work dir: metrics.json, table.md, run.json, grid.png and an image index."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from arcflow.evaluation.store import EvalItem, ImageStore
from arcflow.images import read_png, save_grid

STANDARD_METRICS = ("fid_teacher", "pfid_teacher", "fid_real", "clip_score", "hpsv2", "image_reward", "latent_mse",
                    "psnr", "lpips", "images_per_s_student", "images_per_s_teacher", "prompt_accuracy")
"""The keys every metrics.json has (a number or null), whatever could be computed."""

TABLE_ROWS = (
    ("fid_teacher", None, "FID vs the teacher's images (FID-T)"),
    ("pfid_teacher", None, "patch-FID vs the teacher's images (native-resolution centre crops)"),
    ("fid_real", "fid_real_teacher", "FID vs real images"),
    ("clip_score", "clip_score_teacher", "CLIP score (100 x cosine)"),
    ("hpsv2", "hpsv2_teacher", "HPSv2.1"),
    ("image_reward", "image_reward_teacher", "ImageReward"),
    ("prompt_accuracy", "prompt_accuracy_teacher", "prompt accuracy (semantic hook)"),
    ("latent_mse", None, "latent MSE vs the teacher, same noise"),
    ("psnr", None, "PSNR dB vs the teacher, same noise"),
    ("lpips", None, "LPIPS vs the teacher, same noise"),
    ("images_per_s_student", "images_per_s_teacher", "images/s"),
    ("peak_memory_gb_student", "peak_memory_gb_teacher", "peak GPU memory GB"),
)
"""(evaluated sampler's key, teacher's key, what it is): the rows of table.md, then any other (hook) metric."""


def _format(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4f}" if abs(value) < 100 else f"{value:.1f}"


def markdown_table(values: dict[str, float | None], reasons: dict[str, str], run: dict[str, Any]) -> str:
    """The evaluated sampler and the teacher's reference side by side, one row per metric, with why-nots."""
    rows = list(TABLE_ROWS)
    listed = {key for row in rows for key in row[:2] if key}
    rows += [(name, name + "_teacher" if name + "_teacher" in values else None, "")
             for name in sorted(values) if name not in listed and not name.endswith("_teacher")]
    lines = [f"{run['candidate']} vs {run['reference']} on {run['num_prompts']} prompts of {run['prompts']} "
             f"({run['device']}, {run['world_size']} rank(s), {run['wall_seconds']} s)", "",
             f"| metric | {run['candidate']} | {run['reference']} | note |", "| --- | --- | --- | --- |"]
    for name, teacher, what in rows:
        note = what
        if values.get(name) is None and name in reasons:
            note = f"{what}; unavailable: {reasons[name]}" if what else f"unavailable: {reasons[name]}"
        reference = _format(values.get(teacher)) if teacher else "(reference)"
        lines.append(f"| {name} | {_format(values.get(name))} | {reference} | {note} |")
    return "\n".join(lines) + "\n"


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def write_outputs(work_dir: Path, values: dict[str, float | None], reasons: dict[str, str], run: dict[str, Any],
                  items: list[EvalItem], candidate: ImageStore, reference: ImageStore, grid_prompts: int) -> None:
    record = {**values, "unavailable": {k: v for k, v in sorted(reasons.items()) if values.get(k) is None}}
    _write_text(work_dir / "metrics.json", json.dumps(record, indent=1) + "\n")
    _write_text(work_dir / "run.json", json.dumps(run, indent=1) + "\n")
    _write_text(work_dir / "table.md", markdown_table(values, reasons, run))
    index = [{"index": item.index, "prompt": item.prompt, "height": item.height, "width": item.width,
              "candidate": str(candidate.png(item.name)), "teacher": str(reference.png(item.key))} for item in items]
    _write_text(work_dir / "images" / "index.jsonl", "".join(json.dumps(row) + "\n" for row in index))
    shown = items[:grid_prompts]
    if shown:
        rows = [[read_png(reference.png(item.key)).float() / 255, read_png(candidate.png(item.name)).float() / 255]
                for item in shown]
        save_grid(rows, work_dir / "grid.png")
