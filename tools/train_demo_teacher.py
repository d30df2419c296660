"""Train the demo's small FLUX-architecture teacher on synthetic scenes.

    python tools/train_demo_teacher.py assets/demo_teacher

With the default recipe this trains the VAE (6,000 steps), then the transformer (6,000
flow-matching steps with caption dropout, then 2,000 guidance-distillation steps). The
shipped teacher was trained on a 2-core CPU in about 78 minutes (0.41 s per VAE step, 0.25 s
per flow-matching step, 0.33 s per guidance step, bf16 autocast); a GPU takes minutes. Writes a
FluxPipeline folder (diffusers layout, fp16 safetensors) with ``training.json`` recording the
recipe, the device and this command. ``--set key=value`` overrides a recipe field.

Later stages change a teacher folder in place and append themselves to ``training.json``:
``--finetune-decoder STEPS`` sharpens the VAE decoder; ``--retrain-transformer`` trains the
transformer again on the folder's VAE (with ``--set`` overrides of transformer fields).
"""

import argparse
import dataclasses
import json
import shlex
import sys

import torch
import transformers

from arcflow.demo.teacher_training import TeacherRecipe, finetune_decoder, retrain_transformer, train_demo_teacher


def _overrides(items: list[str]) -> dict[str, object]:
    """``key=value`` TeacherRecipe overrides (values parsed as JSON, e.g. vae_channels=[16,32,64,64])."""
    fields = {field.name: field for field in dataclasses.fields(TeacherRecipe)}
    values = {}
    for item in items:
        key, _, raw = item.partition("=")
        if key not in fields:
            raise SystemExit(f"unknown recipe key {key!r}; valid: {', '.join(fields)}")
        value = json.loads(raw)
        values[key] = tuple(value) if isinstance(value, list) else value
    return values


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
    parser.add_argument("--retrain-transformer", action="store_true",
                        help="instead of training: train the transformer of the teacher in OUT_DIR again on its VAE")
    parser.add_argument("--decoder-lr", type=float, default=3e-4, help="learning rate of --finetune-decoder")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override TeacherRecipe fields")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    command = "python " + " ".join(shlex.quote(arg) for arg in sys.argv)
    device = torch.device(args.device)
    if args.finetune_decoder:
        finetune_decoder(args.out_dir, args.finetune_decoder, args.decoder_lr, command=command, log=_print,
                         device=device)
    elif args.retrain_transformer:
        retrain_transformer(args.out_dir, _overrides(args.set), command=command, log=_print, device=device)
    else:
        train_demo_teacher(args.out_dir, TeacherRecipe(**_overrides(args.set)), command=command, log=_print,
                           device=device)
