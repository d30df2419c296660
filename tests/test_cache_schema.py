"""The cache in the format of the family's conditioning schema: Qwen-Image's variable-length rows with
masks, the negative prompt stored once, bf16 and fp8 storage, the storage estimate, damage named on
load and repaired by a rerun, and the format bump."""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from arcflow.cli import main as arcflow_main
from arcflow.config import load_config
from arcflow.data.batches import build_train_data, build_val_data
from arcflow.data.cache_codec import RowDecoder, encode_rows, quantize, quantize_tokens
from arcflow.data.cache_files import read_header
from arcflow.data.embedding_cache import CachedSplit, CacheError, shard_path, verify_cache
from arcflow.models.base import ConditioningSchema
from arcflow.models.qwen_image.text_encoder import PretrainedQwenImageTextEncoder

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs/demo/arcflux_tiny_2nfe.py"
QWEN = ConditioningSchema(sequences={"prompt_embeds": "prompt_embeds_mask"}, negative_prompt="")
WORDS = ["red", "blue", "cube", "sphere", "on", "a", "wooden", "table", "under", "two", "large", "lamps"]


def run_tool(argv: list[str]) -> None:
    spec = importlib.util.spec_from_file_location("cache_tool", REPO / "tools/cache_image_prompt_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(argv)


def write_prompts(path: Path, count: int) -> Path:
    """Prompts of 1 to 40 words: rows of very different lengths."""
    lines = [json.dumps({"prompt": " ".join(WORDS[(i * k) % len(WORDS)] for k in range(1 + (i * 7) % 40)),
                         "height": 128, "width": 128}) for i in range(count)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def qwen_setup(tiny_qwen_dir, tmp_path_factory) -> dict:
    """A run config for the tiny Qwen-Image (the demo recipe on another backbone) and its cache, built."""
    tmp = tmp_path_factory.mktemp("qwen_cache")
    config = tmp / "qwen_tiny.py"
    config.write_text(f"_base_ = [{str(DEMO)!r}]\nmodel = dict(backbone='qwen_image', text_encoder=dict("
                      "type='PretrainedQwenImageTextEncoder', max_sequence_length=64))\n"
                      "data = dict(cache_storage='bf16')\n")
    encoder_config = tmp / "_text_encoder.py"
    encoder_config.write_text("model = dict(text_encoder=dict(type='PretrainedQwenImageTextEncoder', "
                              "max_sequence_length=64))\n")
    opts = {"model.pretrained": str(tiny_qwen_dir), "data.source": str(write_prompts(tmp / "prompts.jsonl", 28)),
            "data.data_root": str(tmp / "root"), "data.shard_size": 8, "data.train.end_ind": -4,
            "data.val.start_ind": -4}
    setup = {"config": config, "encoder_config": encoder_config, "opts": opts, "tmp": tmp}
    run_tool(argv(setup))
    return setup


def argv(setup: dict, **extra) -> list[str]:
    opts = {**setup["opts"], **extra}
    return [str(setup["config"]), "--text-encoder", str(setup["encoder_config"]), "--batch-size", "4",
            "--cfg-options", *[f"{k}={v}" for k, v in opts.items()]]


def copy_cache(setup: dict, tmp_path: Path) -> dict:
    root = tmp_path / "root"
    shutil.copytree(setup["opts"]["data.data_root"], root)
    return {**setup, "opts": {**setup["opts"], "data.data_root": str(root)}}


def flip(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x10
    path.write_bytes(bytes(raw))


# -- the row codec ----------------------------------------------------------------------------------
def test_rows_are_stored_unpadded_and_rebuilt_with_their_masks():
    lengths = [3, 9, 1]
    embeds = torch.randn(3, 9, 16)
    mask = (torch.arange(9)[None] < torch.tensor(lengths)[:, None]).long()
    embeds = embeds * mask[..., None]
    for storage in ("bf16", "fp8"):
        rows = encode_rows({"prompt_embeds": embeds, "prompt_embeds_mask": mask}, QWEN, storage)
        assert rows.lengths["prompt_embeds"].tolist() == lengths
        decoder = RowDecoder(storage, 2, 9, 16)
        for j, i in enumerate((2, 0)):  # a batch of the 1- and 3-token prompts pads to 3... of the buffer's 9
            decoder.put(j, rows.blobs["prompt_embeds"][i], lengths[i])
        values, rebuilt = decoder.tensors("cpu", torch.float32)
        assert torch.equal(rebuilt[:, :3], mask[[2, 0], :3]) and not rebuilt[:, 3:].any()
        reference = embeds[[2, 0]] if storage == "fp8" else embeds[[2, 0]].bfloat16().float()
        tolerance = reference.abs() / 16 + 1e-6 if storage == "fp8" else 0
        assert ((values - reference).abs() <= tolerance).all()
    # Storage grows with the prompt's tokens, not with the batch's padding.
    rows = encode_rows({"prompt_embeds": torch.randn(2, 64, 256) * 0 + torch.randn(2, 64, 256),
                        "prompt_embeds_mask": (torch.arange(64)[None] < torch.tensor([[4], [64]])).long()},
                       QWEN, "bf16")
    short, long = (len(b) for b in rows.blobs["prompt_embeds"])
    assert short * 10 < long
    with pytest.raises(ValueError, match="not right padding"):
        encode_rows({"prompt_embeds": embeds, "prompt_embeds_mask": mask.flip(1)}, QWEN, "bf16")
    with pytest.raises(ValueError, match=r"'prompt_embeds' has non-finite values for batch rows \[1\]"):
        encode_rows({"prompt_embeds": embeds.index_fill(0, torch.tensor([1]), float("inf")),
                     "prompt_embeds_mask": mask}, QWEN, "fp8")


def test_fp8_scale_per_token_keeps_tokens_next_to_a_massive_activation():
    """One token with an activation 10^4 above the rest (as Qwen2.5-VL's first token has): a scale per
    prompt flushes every other token into e4m3's subnormals; a scale per token does not."""
    x = torch.randn(1, 32, 64, dtype=torch.float64)
    x[0, 0, 5] = 3e4
    codes, scale = quantize(x)
    per_prompt = codes.view(torch.float8_e4m3fn).double() * scale.double()[:, None, None]
    codes, exponent = quantize_tokens(x)
    per_token = codes.view(torch.float8_e4m3fn).double() * torch.exp2(exponent.double())[..., None]
    error = {name: ((y - x)[0, 1:].norm(dim=-1) / x[0, 1:].norm(dim=-1)).max().item()
             for name, y in (("prompt", per_prompt), ("token", per_token))}
    assert error["token"] < 0.05 < error["prompt"]


# -- the Qwen-Image cache ---------------------------------------------------------------------------
def test_qwen_cache_equals_encode_prompt_with_masks_and_one_negative(qwen_setup, tiny_qwen_dir):
    root = Path(qwen_setup["opts"]["data.data_root"])
    negative_files = sorted(p.relative_to(root).as_posix() for p in root.rglob("negative*"))
    assert negative_files == ["negative.safetensors"]
    encoder = PretrainedQwenImageTextEncoder(str(tiny_qwen_dir), max_sequence_length=64, torch_dtype="float32")
    empty = encoder.encode([""])
    stored = load_file(str(root / "negative.safetensors"))
    assert torch.equal(stored["prompt_embeds"], empty["prompt_embeds"])
    assert torch.equal(stored["prompt_embeds_mask"], empty["prompt_embeds_mask"])

    cache = CachedSplit(root / "train")
    assert cache.manifest["storage"]["dtype"] == "bf16"
    rows = [5, 0, 17]
    texts = [cache.table.texts[i].as_py() for i in rows]
    reference = encoder.encode(texts)
    cond = cache.load(rows, "cpu", torch.float32)
    assert cond["prompt_embeds_mask"].dtype == torch.long
    assert torch.equal(cond["prompt_embeds_mask"], reference["prompt_embeds_mask"])
    assert len(set(reference["prompt_embeds_mask"].sum(1).tolist())) == 3  # three different lengths
    assert torch.equal(cond["prompt_embeds"], reference["prompt_embeds"].bfloat16().float())
    assert torch.equal(cond["negative_prompt_embeds"], empty["prompt_embeds"].expand(3, -1, -1))
    assert torch.equal(cond["negative_prompt_embeds_mask"], empty["prompt_embeds_mask"].expand(3, -1))

    cfg = load_config(qwen_setup["config"], qwen_setup["opts"])
    fly_cfg = load_config(qwen_setup["config"], {**qwen_setup["opts"], "data.cache": "never"})
    cached, fly = build_train_data(cfg, "cpu", 0, 1, seed=1), build_train_data(fly_cfg, "cpu", 0, 1, seed=1)
    assert cached.source == "cache" and fly.source == "encoder"
    (p_cache, c_cache), (p_fly, c_fly) = cached.next_batch(), fly.next_batch()
    assert p_cache == p_fly and set(c_cache) == set(c_fly)
    for key in c_fly:
        expected = c_fly[key].bfloat16().float() if key == "prompt_embeds" else c_fly[key]
        assert torch.equal(c_cache[key], expected), key
    val = build_val_data(cfg, "cpu")
    assert set(val.encode([val.prompts[0].text])) == set(c_fly)


def test_fp8_storage_and_the_estimate_from_sampled_lengths(qwen_setup, tmp_path, capsys):
    setup = {**qwen_setup, "opts": {**qwen_setup["opts"], "data.data_root": str(tmp_path / "fp8")}}
    run_tool(argv(setup, **{"data.cache_storage": "fp8"}))
    out = capsys.readouterr().out
    assert "sampled 24 training prompts: prompt_embeds " in out and "(fp8)" in out
    estimate = float(out.split("storage needed: about ")[1].split(" kB")[0].replace(",", "")) * 1000
    fp8, bf16 = (CachedSplit(Path(root) / "train") for root in (tmp_path / "fp8", qwen_setup["opts"]["data.data_root"]))
    actual = sum(json.loads((tmp_path / "fp8" / s / "manifest.json").read_text())["stored_bytes"] for s in ("train", "val"))
    assert abs(estimate - actual) < 0.25 * actual
    assert fp8.manifest["stored_bytes"] < 0.75 * bf16.manifest["stored_bytes"]
    rows = list(range(8))
    low, high = fp8.load(rows, "cpu", torch.float32), bf16.load(rows, "cpu", torch.float32)
    assert torch.equal(low["prompt_embeds_mask"], high["prompt_embeds_mask"])
    assert ((low["prompt_embeds"] - high["prompt_embeds"]).abs() <= high["prompt_embeds"].abs() / 14 + 1e-6).all()


def test_damaged_shard_found_by_verify_is_rebuilt_alone_by_a_rerun(qwen_setup, tmp_path, capsys):
    setup = copy_cache(qwen_setup, tmp_path)
    train = Path(setup["opts"]["data.data_root"]) / "train"
    damaged = shard_path(train, 1)
    header, start = read_header(damaged)
    flip(damaged, start + header["prompt_embeds.blob"]["data_offsets"][0] + 7)
    with pytest.raises(SystemExit, match="shard_000001.safetensors: content hash"):
        arcflow_main(["cache", "verify", str(setup["config"]), "--cfg-options",
                      *[f"{k}={v}" for k, v in setup["opts"].items()]])
    kept = {s: shard_path(train, s).stat().st_mtime_ns for s in (0, 2)}
    capsys.readouterr()
    arcflow_main(["cache", "build", *argv(setup)])  # the tool's command, from the CLI
    out = capsys.readouterr().out
    assert "train: rebuilding 1 shard(s) that fail verification: shard_000001.safetensors" in out
    assert "2 already complete, 1 to write" in out and "val: already complete" in out
    assert {s: shard_path(train, s).stat().st_mtime_ns for s in (0, 2)} == kept
    assert verify_cache(setup["opts"]["data.data_root"], say=lambda message: None) == []
    arcflow_main(["cache", "verify", str(setup["config"]), "--cfg-options",
                  *[f"{k}={v}" for k, v in setup["opts"].items()]])


@pytest.mark.parametrize("victim", ["index.arrow", "manifest.json", "../negative.safetensors"])
def test_any_damaged_cache_file_is_named_on_load_and_repaired_by_a_rerun(qwen_setup, tmp_path, victim):
    setup = copy_cache(qwen_setup, tmp_path)
    train = Path(setup["opts"]["data.data_root"]) / "train"
    path = (train / victim).resolve()
    text = path.read_bytes()
    offset = text.index(b'"num_prompts": ') + 16 if victim == "manifest.json" else len(text) - 3
    flip(path, offset)
    with pytest.raises(CacheError, match=path.name):
        CachedSplit(train)
    kept = [shard_path(train, s).stat().st_mtime_ns for s in range(3)]
    run_tool(argv(setup))
    CachedSplit(train).load([0, 1], "cpu", torch.float32)
    assert [shard_path(train, s).stat().st_mtime_ns for s in range(3)] == kept


def test_a_format_1_cache_is_refused_with_what_to_do(qwen_setup, tmp_path):
    setup = copy_cache(qwen_setup, tmp_path)
    train = Path(setup["opts"]["data.data_root"]) / "train"
    (train / "manifest.json").write_text(json.dumps({"format": "arcflow-prompt-cache/1", "complete": True}))
    with pytest.raises(CacheError, match="'arcflow-prompt-cache/1' cache.*rebuild it with tools/cache_image"):
        CachedSplit(train)


def test_storage_benchmark_figures_are_consistent():
    spec = importlib.util.spec_from_file_location("cache_storage", REPO / "benchmarks/cache_storage.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    figures = module.main(["--prompts", "2", "--dim", "256", "--lengths", "8", "32", "--total-prompts", "1000"])
    sink = figures["error_per_token"]["outlier_channels_x20_and_sink_x1000"]
    assert sink["fp8_per_token"]["max"] < 0.06 < sink["fp8_per_prompt"]["max"]
    assert sink["bf16"]["max"] < 0.005
    sizes = figures["bytes_per_prompt"]
    assert sizes["fp8"]["32"] < 0.6 * sizes["bf16"]["32"] and 3 * sizes["bf16"]["8"] < sizes["bf16"]["32"]
    assert figures["projection_gb"]["fp8"]["8"] == pytest.approx(sizes["fp8"]["8"] * 1000 / 1e9)


# -- the seed's Qwen-Image cache command, word for word -------------------------------------------------
SEED_COMMAND = ("torchrun --nnodes=1 --nproc_per_node=2 tools/cache_image_prompt_data.py configs/qwen/arcqwen_2nfe_k16.py "
                "--text-encoder configs/qwen/_text_encoder.py --max-size 2304128 --launcher pytorch --diff_seed")


def test_seed_qwen_cache_command_killed_rerun_verified_and_trained_on(tiny_qwen_dir, tmp_path):
    from test_cache_tool import DYING, free_port

    prompts = write_prompts(tmp_path / "prompts.jsonl", 36)
    data = {"data.source": prompts, "data.data_root": tmp_path / "cache", "data.shard_size": 4,
            "data.train.end_ind": -4, "data.val.start_ind": -4, "data.val.repeat": 1,
            **{f"data.{split}.{side}": 128 for split in ("train", "val") for side in ("height", "width")}}
    cfg_options = ["--cfg-options", f"model.pretrained={tiny_qwen_dir}", *[f"{k}={v}" for k, v in data.items()]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PET_MASTER_PORT": str(free_port())}
    command = [*shlex.split(SEED_COMMAND), *cfg_options]
    dying = tmp_path / "dying.py"
    dying.write_text(DYING)
    killed = subprocess.run([command[0], *command[1:3], str(dying), *command[3:]], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300, check=False)
    train = tmp_path / "cache" / "train"
    assert killed.returncode != 0 and "SIGKILL" in killed.stderr
    done = len(list((train / "shards").glob("*.safetensors")))
    assert 0 < done < 8 and not (train / "manifest.json").exists()  # 32 training prompts: 8 shards of 4

    env["PET_MASTER_PORT"] = str(free_port())
    rerun = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"{done} already complete, {8 - done} to write on 2 rank(s)" in rerun.stdout
    assert "storage needed: about" in rerun.stdout and "sampled 32 training prompts" in rerun.stdout
    arcflow_main(["cache", "verify", "configs/qwen/arcqwen_2nfe_k16.py", *cfg_options])
    assert (tmp_path / "cache" / "negative.safetensors").is_file()

    def train_once(work_dir: Path, **extra) -> str:
        options = {"model.pretrained": tiny_qwen_dir, **data, "train_cfg.batch_size": 2, "total_iters": 1,
                   "val_cfg.num_prompts": 2, "val_cfg.teacher_steps": 2, "eval_interval": 0, "save_interval": 1000,
                   "model.text_encoder.max_sequence_length": 512, **extra}
        arcflow_main(["train", str(REPO / "configs/demo/arcqwen_tiny_2nfe.py"), "--work-dir", str(work_dir),
                      "--cfg-options", *[f"{k}={v}" for k, v in options.items()]])
        return (work_dir / "train.log").read_text()

    log = train_once(tmp_path / "cached")
    assert f"conditioning source: the prompt-embedding cache {train}" in log
    fly = train_once(tmp_path / "fly", **{"data.cache": "never"})
    assert "on the fly" in fly
    loss = [json.loads((tmp_path / run / "metrics.jsonl").read_text().splitlines()[0])["loss"] for run in ("cached", "fly")]
    assert loss[0] == pytest.approx(loss[1], rel=0.02)  # bf16 rows of a float32 encoder: nearly the same step


@pytest.mark.parametrize("victim", ["shards/shard_000001.safetensors", "index.arrow", "manifest.json",
                                    "../negative.safetensors"])
def test_flipped_bytes_anywhere_are_named_never_read_as_data(qwen_setup, tmp_path, victim):
    """Fault injection: a byte flipped at random offsets of each file kind. ``arcflow cache verify`` names
    the file every time; reading the split either raises an error naming it or returns exactly the
    undamaged tensors (bytes the reader never uses, such as a shard's copy of the prompt texts)."""
    clean_root = Path(qwen_setup["opts"]["data.data_root"])
    clean = CachedSplit(clean_root / "train")
    batches = [list(range(i, min(i + 8, len(clean.table)))) for i in range(0, len(clean.table), 8)]
    expected = [clean.load(rows, "cpu", torch.float32) for rows in batches]
    size = (clean_root / "train" / victim).stat().st_size
    rng = np.random.default_rng(0)
    for attempt, offset in enumerate(rng.choice(size, 6, replace=False)):
        root = tmp_path / f"attempt{attempt}"
        shutil.copytree(clean_root, root)
        path = (root / "train" / victim).resolve()
        raw = bytearray(path.read_bytes())
        raw[int(offset)] ^= int(rng.integers(1, 256))
        path.write_bytes(bytes(raw))
        problems = verify_cache(str(root), say=lambda message: None)
        assert any(path.name in p for p in problems), (offset, problems)
        try:
            split = CachedSplit(root / "train")
            for rows, reference in zip(batches, expected):
                cond = split.load(rows, "cpu", torch.float32)
                assert set(cond) == set(reference) and all(torch.equal(cond[k], reference[k]) for k in cond), offset
        except CacheError as err:
            assert path.name in str(err), (offset, err)
        shutil.rmtree(root)


@pytest.mark.parametrize("victim", ["manifest.json", "shards/shard_000000.safetensors"])
def test_training_on_a_damaged_cache_stops_with_one_line_naming_the_file(qwen_setup, tmp_path, capsys, victim):
    """The manifest is read by every rank before training (said once); a shard by the rank whose rows
    it holds, during training (said by that rank). Either way: the file, what to do, no traceback."""
    setup = copy_cache(qwen_setup, tmp_path)
    path = Path(setup["opts"]["data.data_root"]) / "train" / victim
    if victim == "manifest.json":
        flip(path, path.read_bytes().index(b'"num_prompts": ') + 16)
    else:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    options = {**setup["opts"], "data.cache": "always", "train_cfg.batch_size": 4, "total_iters": 4,
               "val_cfg.num_prompts": 2, "eval_interval": 0, "save_interval": 1000}
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        arcflow_main(["train", str(setup["config"]), "--work-dir", str(tmp_path / "run"),
                      "--cfg-options", *[f"{k}={v}" for k, v in options.items()]])
    err = capsys.readouterr().err
    assert stop.value.code == 1 and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("arcflow: error:")]
    assert len(lines) == 1 and path.name in lines[0] and f"arcflow cache verify {setup['config']}" in lines[0]
    assert ("rank 0/1" in lines[0]) == (victim != "manifest.json")
