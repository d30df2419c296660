"""Export a training checkpoint's EMA student as a diffusers adapter folder (same as ``arcflow export``).

    python tools/export_arcflow_to_diffusers.py configs/flux/arcflux_2nfe_k16.py \
        --ckpt checkpoints/arcflux_2nfe_k16 --out-dir exports/arcflux_2nfe_k16 [--dtype bfloat16]

The folder loads with ``ArcFluxPipeline.load_arcflow_adapter`` (see arcflow/pipelines/adapter.py).
"""

import argparse

from arcflow.inference.commands import add_export_arguments, run_export

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_export_arguments(parser)
    run_export(parser.parse_args())
