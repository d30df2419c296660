"""Train the demo's small FLUX-architecture teacher on synthetic scenes.

    python tools/train_demo_teacher.py assets/demo_teacher

About 3 minutes on one H100 (how the shipped teacher was made); on a CPU it runs too, at
roughly 1 s per VAE step and 0.3 s per transformer step on 2 cores. Writes a FluxPipeline
folder (diffusers layout, fp16 safetensors) with ``training.json`` recording the recipe,
the device and this command. ``--set key=value`` overrides a recipe field.
"""

import argparse
import dataclasses
import json
import shlex
import sys

import torch
import transformers

from arcflow.teacher_training import TeacherRecipe, finetune_decoder, train_demo_teacher


def _recipe(overrides: list[str]) -> TeacherRecipe:
    """A TeacherRecipe with ``key=value`` overrides (values parsed as JSON, e.g. vae_channels=[16,32,64,64])."""
    fields = {field.name: field for field in dataclasses.fields(TeacherRecipe)}
    values = {}
    for item in overrides:
        key, _, raw = item.partition("=")
        if key not in fields:
            raise SystemExit(f"unknown recipe key {key!r}; valid: {', '.join(fields)}")
        value = json.loads(raw)
        values[key] = tuple(value) if isinstance(value, list) else value
    return TeacherRecipe(**values)


def _print(message: str) -> None:
    print(message, flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="the pipeline folder to write (must be absent or empty)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where to train (default: cuda when available)")
    parser.add_argument("--finetune-decoder", type=int, metavar="STEPS",
                        help="instead of training: fine-tune the VAE decoder of the teacher in OUT_DIR for STEPS "
                             "steps (encoder, latent space and transformer unchanged)")
    parser.add_argument("--decoder-lr", type=float, default=3e-4, help="learning rate of --finetune-decoder")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override TeacherRecipe fields")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    command = "python " + " ".join(shlex.quote(arg) for arg in sys.argv)
    if args.finetune_decoder:
        finetune_decoder(args.out_dir, args.finetune_decoder, args.decoder_lr, command=command, log=_print,
                         device=torch.device(args.device))
    else:
        train_demo_teacher(args.out_dir, _recipe(args.set), command=command, log=_print, device=torch.device(args.device))
