"""Two CPU ranks over gloo through torchrun: a run is a function of its global batch (DDP, FSDP2, micro-batches,
resuming on another world size, at the default LoRA dropout, on prompts of several sizes), failures."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import read_checkpoint_group

REPO = Path(__file__).resolve().parents[1]
DEMO = "configs/demo/arcflux_tiny_2nfe.py"


def common(tiny: Path, **extra) -> dict:
    base = {"model.pretrained": str(tiny), "data.cache": "never", "val_cfg.num_prompts": 2,
            "val_cfg.teacher_steps": 4, "eval_interval": 0, "save_interval": 1000}
    base.update(extra)
    return base


def torchrun(nproc: int, args: list[str], **kwargs) -> subprocess.Popen:
    # --standalone: a local rendezvous on a free port, so runs never collide with a busy one.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, **kwargs)


def worker(nproc: int, work_dir: Path, options: dict, config: str | Path = DEMO) -> dict:
    out = work_dir / "ranks.json"
    args = ["tests/dist_worker.py", str(config), str(work_dir), str(out)] + [f"{k}={v}" for k, v in options.items()]
    proc = torchrun(nproc, args)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-3000:]
    metrics = [json.loads(line) for line in (work_dir / "metrics.jsonl").read_text().splitlines()]
    return {"ranks": json.loads(out.read_text())["ranks"], "metrics": metrics, "output": output}


@pytest.fixture(scope="module")
def bucket_prompts(tmp_path_factory) -> dict:
    """12 training prompts in 3 size buckets (5, 4, 3: each a global batch of 8, topped up), then 8 for
    validation; the LR is at full strength from the first step, so each update moves the weights."""
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    sizes = [(64, 64)] * 5 + [(48, 64)] * 4 + [(64, 48)] * 3 + [(64, 64)] * 8
    path.write_text("".join(json.dumps({"prompt": f"shape {i} in colour {i % 5}", "height": h, "width": w}) + "\n"
                            for i, (h, w) in enumerate(sizes)))
    return {"data.source": str(path), "optimizer.warmup_iters": 0}


@pytest.fixture(scope="module")
def one_process(tiny_flux_dir, bucket_prompts, tmp_path_factory) -> dict:
    """Global batch 8 in one process: the reference run."""
    work_dir = tmp_path_factory.mktemp("one")
    run = worker(1, work_dir, common(tiny_flux_dir, total_iters=2, **bucket_prompts, **{"train_cfg.batch_size": 8}))
    return {**run, "work_dir": work_dir}


def assert_same_update(one: dict, two: dict) -> None:
    assert [r["iter"] for r in one["metrics"]] == [r["iter"] for r in two["metrics"]] == [1, 2]
    for a, b in zip(one["metrics"], two["metrics"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    for name, (total, l1) in one["ranks"][0].items():
        assert two["ranks"][0][name][0] == pytest.approx(total, rel=1e-4, abs=1e-5), name
        assert two["ranks"][0][name][1] == pytest.approx(l1, rel=1e-4, abs=1e-5), name


def test_ddp_matches_one_process_with_the_same_global_batch(tiny_flux_dir, bucket_prompts, one_process, tmp_path):
    """Global batch 8 on one process or 2 x 4 on two ranks: the same run."""
    two = worker(2, tmp_path / "two", common(tiny_flux_dir, total_iters=2, **bucket_prompts,
                                             **{"train_cfg.batch_size": 4}))
    assert two["ranks"][0] == two["ranks"][1]  # replicas stay identical, bit for bit
    assert_same_update(one_process, two)
    assert "FutureWarning" not in two["output"]  # DDP is built without deprecated flags


def test_fsdp2_matches_one_process_with_the_same_global_batch(tiny_flux_dir, bucket_prompts, one_process, tmp_path):
    """FSDP2 on 2 ranks gives one process's update. FLUX's single-stream blocks return views, which FSDP2
    warns about (an in-place op on them would skip a pre-backward all-gather); nothing modifies them, so
    every gradient arrives, and the warning is silenced at the source."""
    two = worker(2, tmp_path / "two", common(tiny_flux_dir, total_iters=2, **bucket_prompts,
                                             **{"train_cfg.batch_size": 4, "train_cfg.parallel": "fsdp"}))
    assert two["ranks"][0] == two["ranks"][1]
    assert_same_update(one_process, two)
    assert "returned a view tensor" not in two["output"]


def test_micro_batches_on_two_ranks_resume_on_one_rank_as_the_same_run(tiny_flux_dir, bucket_prompts, one_process,
                                                                        tmp_path):
    """2 x 4 in micro-batches of 1 (with --diff_seed, as the README's commands pass it) for one iteration, then
    resumed on 1 rank x 8: the one-process run's losses, gradient norms and weights."""
    options = common(tiny_flux_dir, total_iters=1, save_interval=1, **bucket_prompts,
                     **{"train_cfg.batch_size": 4, "train_cfg.grad_accum_batch_size": 1})
    args = ["tools/train.py", DEMO, "--launcher", "pytorch", "--diff_seed", "--work-dir", str(tmp_path / "run"),
            "--cfg-options", *[f"{k}={v}" for k, v in options.items()]]
    proc = torchrun(2, args)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-3000:]
    resumed = worker(1, tmp_path / "run", common(tiny_flux_dir, total_iters=2, **bucket_prompts,
                                                 **{"train_cfg.batch_size": 8}))
    assert "saved on 2 ranks" in (tmp_path / "run" / "train.log").read_text()
    assert_same_update(one_process, resumed)
    ours = read_checkpoint_group(tmp_path / "run" / "checkpoints" / "iter_0000002", "model")
    reference = read_checkpoint_group(one_process["work_dir"] / "checkpoints" / "iter_0000002", "model")
    assert ours.keys() == reference.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], reference[key], rtol=1e-4, atol=1e-6)


def test_fsdp_resumes_on_another_world_size(tiny_flux_dir, tmp_path):
    """Global batch 4: 2 ranks x 2 or 1 rank x 4, sharded checkpoints resharded either way."""
    fsdp = {"train_cfg.parallel": "fsdp", "save_interval": 2}
    on_two, on_one = {**fsdp, "train_cfg.batch_size": 2}, {**fsdp, "train_cfg.batch_size": 4}
    saved = worker(2, tmp_path / "run", common(tiny_flux_dir, total_iters=2, **on_two))
    assert (tmp_path / "run" / "checkpoints" / "iter_0000002" / "state.json").is_file()
    # One rank loads the two ranks' shards: the same weights, gathered, with nothing left to train.
    loaded = worker(1, tmp_path / "run", common(tiny_flux_dir, total_iters=2, **on_one))
    assert loaded["ranks"][0] == saved["ranks"][0] == saved["ranks"][1]
    # It trains on, saves on one rank, and two ranks pick that up.
    worker(1, tmp_path / "run", common(tiny_flux_dir, total_iters=4, **on_one))
    again = worker(2, tmp_path / "run", common(tiny_flux_dir, total_iters=5, **on_two))
    assert [r["iter"] for r in again["metrics"]] == [1, 2, 3, 4, 5]
    assert all(r["loss"] == r["loss"] and r["loss"] < 100 for r in again["metrics"])
    # Another global batch is another run: refused, naming what changed.
    proc = torchrun(1, ["tests/dist_worker.py", DEMO, str(tmp_path / "run"), str(tmp_path / "x.json"),
                        *[f"{k}={v}" for k, v in common(tiny_flux_dir, total_iters=6, **on_two).items()]])
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode != 0 and "global_batch_size=4, this run has 2" in output, output[-3000:]


def _rank_process(proc: subprocess.Popen, local_rank: int, timeout: float = 120) -> psutil.Process:
    deadline = time.time() + timeout
    while time.time() < deadline:
        for child in psutil.Process(proc.pid).children(recursive=True):
            try:
                if child.environ().get("LOCAL_RANK") == str(local_rank) and "train.py" in " ".join(child.cmdline()):
                    return child
            except psutil.Error:
                continue
        time.sleep(0.5)
    raise AssertionError(f"no process for local rank {local_rank}")


def _start_training(tiny: Path, work_dir: Path) -> subprocess.Popen:
    options = common(tiny, total_iters=10000, save_interval=1, **{"train_cfg.batch_size": 1})
    args = ["tools/train.py", DEMO, "--launcher", "pytorch", "--work-dir", str(work_dir), "--cfg-options",
            *[f"{k}={v}" for k, v in options.items()]]
    return torchrun(2, args)


def _wait_for_checkpoint(work_dir: Path, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not list((work_dir / "checkpoints").glob("iter_*/state.json")):
        assert time.time() < deadline, "training never saved a checkpoint"
        time.sleep(0.5)


def test_a_killed_rank_fails_the_job_and_is_named(tiny_flux_dir, tmp_path):
    proc = _start_training(tiny_flux_dir, tmp_path / "run")
    _wait_for_checkpoint(tmp_path / "run")
    _rank_process(proc, 1).send_signal(signal.SIGKILL)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "rank      : 1 (local_rank: 1)" in output or "local_rank: 1" in output, output[-3000:]


def test_sigterm_on_one_rank_stops_all_ranks_cleanly(tiny_flux_dir, tmp_path):
    proc = _start_training(tiny_flux_dir, tmp_path / "run")
    _wait_for_checkpoint(tmp_path / "run")
    _rank_process(proc, 1).send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "received signal 15" in (tmp_path / "run" / "train.log").read_text()
    checkpoints = tmp_path / "run" / "checkpoints"
    assert not list(checkpoints.glob(".*partial"))  # nothing half-written
    assert all((p / "state.json").is_file() for p in checkpoints.glob("iter_*"))
