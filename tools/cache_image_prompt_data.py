"""Embed a config's prompt set into the prompt-embedding cache (see :mod:`arcflow.data.cache_command`).

    torchrun --nnodes=1 --nproc_per_node=4 tools/cache_image_prompt_data.py configs/qwen/arcqwen_2nfe_k16.py \\
        --text-encoder configs/qwen/_text_encoder.py --max-size 2304128 --launcher pytorch --diff_seed
"""

import sys

from arcflow.data.cache_command import load_run_config, main, parse_args
from arcflow.models.hub import reports_unavailable_model

__all__ = ["load_run_config", "main", "parse_args"]

if __name__ == "__main__":
    sys.exit(reports_unavailable_model(main)())
