"""Distil a flow model into an ArcFlow student.

    python tools/train.py configs/demo/teacher_arcflux_2nfe.py   # the demo teacher in assets/demo_teacher
    torchrun --nnodes=N --nproc_per_node=G --node_rank=R --master_addr=A --master_port=P \
        tools/train.py configs/flux/arcflux_2nfe_k16.py --launcher pytorch --diff_seed
"""

import argparse

from arcflow.cli import add_train_arguments, run_train

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(parser)
    run_train(parser.parse_args())
