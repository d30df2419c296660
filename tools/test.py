"""Evaluate a distilled student against its teacher (the OpenMMLab name of ``arcflow eval``).

    python tools/test.py configs/demo/teacher_arcflux_2nfe.py --ckpt checkpoints/teacher_arcflux_2nfe
    torchrun --nnodes=N --nproc_per_node=G --node_rank=R --master_addr=A --master_port=P \
        tools/test.py configs/flux/arcflux_2nfe_k16.py --ckpt checkpoints/arcflux_2nfe_k16 --launcher pytorch

Writes WORK_DIR/metrics.json (FID-T, pFID-T, FID-real, CLIP, HPSv2, ImageReward, latent MSE, PSNR,
LPIPS, images/s; null with a reason where a metric cannot be computed), table.md, grid.png, run.json.
"""

import argparse

from arcflow.cli import add_eval_arguments, run_eval

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_eval_arguments(parser)
    run_eval(parser.parse_args())
