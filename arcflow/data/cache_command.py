"""Embed a config's prompt set into the sharded prompt-embedding cache under ``data.data_root``.

    torchrun --nnodes=1 --nproc_per_node=4 tools/cache_image_prompt_data.py configs/qwen/arcqwen_2nfe_k16.py \\
        --text-encoder configs/qwen/_text_encoder.py --max-size 2304128 --launcher pytorch --diff_seed

(``arcflow cache build CONFIG --text-encoder ...`` is the same command.) Caches the training split
(at most --max-size prompts, the first of the split) and the validation split with the text encoder
of the --text-encoder config (``model.text_encoder``; weights from the config's ``model.pretrained``),
in the format the family's conditioning schema describes, stored as ``data.cache_storage`` says.
The shards are dealt to all ranks of all nodes (the cache folder must be on a file system every
node sees). Restartable: rerun the same command after a stop, a crash, or a failed ``arcflow cache
verify CONFIG``, and every sound shard is kept while exactly the missing or damaged ones are rebuilt.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import transformers
from mmengine.config import Config, DictAction
from tqdm import tqdm

from arcflow.config import RunConfig, load_config
from arcflow.data.cache_codec import EncodedRows, encode_rows, token_bytes
from arcflow.data.embedding_cache import (SPLITS, CacheError, cache_negative, cache_split, describe_split,
                                          estimate_storage, human_bytes, make_plan, split_dir)
from arcflow.data.prompt_sources import PromptTable, load_prompt_table
from arcflow.distributed import DistEnv, all_reduce_max, destroy_distributed, init_distributed
from arcflow.models import build_text_encoder, text_encoder_type
from arcflow.models.base import ConditioningSchema

ESTIMATE_SAMPLE = 64
"""Prompts of the training split embedded to estimate the storage (their real lengths, not one probe)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="run config: its data section names the prompt set and data_root")
    parser.add_argument("--text-encoder", required=True,
                        help="config with model = dict(text_encoder=dict(...)), e.g. configs/qwen/_text_encoder.py")
    parser.add_argument("--max-size", type=int, help="cache at most this many training prompts (the first ones)")
    parser.add_argument("--batch-size", type=int, default=32, help="prompts per text-encoder call")
    parser.add_argument("--launcher", choices=["none", "pytorch"], default="none",
                        help="'pytorch': started by torchrun")
    parser.add_argument("--diff_seed", action="store_true",
                        help="accepted as in the training command; embedding draws no random numbers")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, default={},
                        help="override config keys, e.g. data.data_root=/scratch/cache data.cache_storage=fp8")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return parser.parse_args(argv)


def load_run_config(args: argparse.Namespace) -> RunConfig:
    """The run config with the --text-encoder file's ``model.text_encoder`` and --max-size applied."""
    path = Path(args.text_encoder)
    if not path.is_file():
        raise SystemExit(f"--text-encoder: config file not found: {path}")
    encoder = Config.fromfile(str(path)).to_dict().get("model", {}).get("text_encoder")
    if not isinstance(encoder, dict):
        raise SystemExit(f"--text-encoder {path}: expected model = dict(text_encoder=dict(type=...)), "
                         "found no model.text_encoder")
    options = {"model.text_encoder": encoder}
    if args.max_size is not None:
        options["data.train.max_size"] = args.max_size
    cfg = load_config(args.config, {**options, **dict(args.cfg_options or {})})
    if not cfg.data.data_root:
        raise SystemExit(f"{args.config}: data.data_root is empty; set where the cache goes")
    return cfg


def load_tables(cfg: RunConfig, env: DistEnv) -> dict[str, PromptTable]:
    """Rank 0 reads (downloads, converts) the prompt set first; the others then hit datasets' local cache."""
    tables: dict[str, PromptTable] = {}
    for turn in (0, 1):
        failure = None
        if env.is_main == (turn == 0):
            try:
                tables = {name: load_prompt_table(getattr(cfg.data, name), f"data.{name}") for name in SPLITS}
            except (ValueError, FileNotFoundError) as err:
                failure = err
        if all_reduce_max(float(failure is not None), env):  # a prompt set rank 0 cannot read: it alone says so
            if failure is not None:
                raise failure
            raise SystemExit(1)
    return tables


def sample_rows(table: PromptTable, encode, schema: ConditioningSchema, storage: str, batch_size: int,
                size: int = ESTIMATE_SAMPLE) -> EncodedRows:
    """The stored form of up to ``size`` prompts spread over ``table`` (a fixed, seeded choice)."""
    picked = np.sort(np.random.default_rng(0).choice(len(table), min(size, len(table)), replace=False))
    texts = [table.texts[int(i)].as_py() for i in picked]
    return EncodedRows.concat([encode_rows({k: v.cpu() for k, v in encode(texts[i:i + batch_size]).items()},
                                           schema, storage) for i in range(0, len(texts), batch_size)])


def main(argv: list[str] | None = None) -> None:
    execute(parse_args(argv))


def execute(args: argparse.Namespace) -> None:
    """Build the cache as ``args`` say, on this process's share of the ranks; errors in one line."""
    if args.batch_size < 1 or (args.max_size is not None and args.max_size < 1):
        raise SystemExit("--batch-size and --max-size must be >= 1")
    transformers.utils.logging.disable_progress_bar()
    env = init_distributed(args.launcher)
    try:
        run(args, env)
    except (CacheError, ValueError, FileNotFoundError) as err:  # the user's data or settings: no traceback
        raise SystemExit(f"rank {env.rank}: error: {err}") from err
    finally:
        destroy_distributed()


def run(args: argparse.Namespace, env: DistEnv) -> None:
    cfg = load_run_config(args)
    say = tqdm.write if env.is_main else (lambda message: None)
    tables = load_tables(cfg, env)
    encoder = build_text_encoder(cfg.model).to(env.device)
    schema: ConditioningSchema = encoder.schema
    storage = cfg.data.cache_storage
    probe = encoder.encode(["a"])
    te = cfg.model.text_encoder
    dims = {key: int(probe[key].shape[-1]) for key in (*schema.sequences, *schema.vectors)}
    identity = {"type": text_encoder_type(cfg.model), "pretrained": te.pretrained or cfg.model.pretrained,
                "max_sequence_length": te.max_sequence_length, "dtype": te.dtype or cfg.model.dtype, "dims": dims}
    plans = {name: make_plan(tables[name], name, getattr(cfg.data, name), identity, cfg.data.shard_size, schema,
                             storage) for name in SPLITS}
    root = Path(cfg.data.data_root)
    root.mkdir(parents=True, exist_ok=True)

    if env.is_main:
        sample = sample_rows(tables["train"], encoder.encode, schema, storage, args.batch_size)
        total = 0
        for name in SPLITS:
            text_bytes = int(pc.sum(pc.binary_length(tables[name].texts)).as_py() or 0)
            total += estimate_storage(sample, len(tables[name]), text_bytes, cfg.data.shard_size)
        rows = "; ".join(f"{key} {min(sample.lengths[key])}-{max(sample.lengths[key])} tokens "
                         f"(mean {np.mean(sample.lengths[key]):.0f}) of {token_bytes(storage, dims[key]):,} B "
                         "before zstd" for key in schema.sequences)
        say(f"prompt-embedding cache of {len(tables['train']):,} training + {len(tables['val']):,} validation prompts "
            f"-> {root} ({storage})\n  sampled {len(sample.crcs)} training prompts: {rows}; "
            f"{float(sample.stored_bytes().mean()):,.0f} B/prompt stored\n  storage needed: about {human_bytes(total)}"
            f" (from that sample); free on that disk: {human_bytes(shutil.disk_usage(root).free)}")
    negative_sha = cache_negative(root, schema, encoder.encode, identity, env, say)

    for name in SPLITS:
        def bar(total: int, name: str = name) -> tqdm:
            return tqdm(total=total, desc=f"{name} (rank {env.rank} of {env.world_size})", unit="prompt",
                        dynamic_ncols=True, disable=not env.is_main)
        start = time.perf_counter()
        report = cache_split(tables[name], split_dir(root, name), plans[name], encoder.encode, args.batch_size, env,
                             progress=bar, say=say, negative_sha=negative_sha)
        if report.encoded:
            seconds = time.perf_counter() - start
            print(f"rank {env.rank}: {name}: {report.encoded:,} prompts in {seconds:.1f} s "
                  f"({report.encoded / seconds:,.1f} prompts/s), {human_bytes(report.stored_bytes)}", flush=True)
        if env.is_main:
            say(describe_split(split_dir(root, name)))
    say(f"cache complete; check it with: arcflow cache verify {args.config}")
