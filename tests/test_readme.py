"""The README is run, not read: every command and the Python snippet in it, exactly as written.

Commands run in a scratch directory that holds the repository's ``configs``, ``tools`` and ``assets``, in
README order (the demo's checkpoint feeds export, generate, sample and eval). Commands that need
FLUX.1-dev from the hub run as written with the hub offline, and must stop before loading anything with
the one line a user without the weights would see. The two install-and-run commands at the top are run
by ``.ci/run`` as written; here the demo part of the first one is run.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from arcflow.images import GRID_INFO_KEY, grid_cell

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
HUB_STOP = "arcflow: error: model.pretrained: black-forest-labs/FLUX.1-dev cannot be fetched from the Hugging Face hub"
QWEN_STOP = "arcflow: error: model.pretrained: Qwen/Qwen-Image cannot be fetched from the Hugging Face hub"
PROMPTS_STOP = "error: could not load the hub dataset 'Lakonik/t2i-prompts-3m'"
PROMPT = "a large red circle on the left on a white background"


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.M | re.S)


def readme_commands() -> list[str]:
    """Shell commands of the README's ``bash`` blocks: continuation lines joined, comments dropped."""
    commands = []
    for block in code_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#\s.*$", "", line.strip())
            if line and not line.startswith("#"):
                commands.append(re.sub(r"\s+", " ", line))
    return commands


COMMANDS = readme_commands()
CHECKS = {
    "demo": "pip install torch==2.13.0 && pip install -e . && arcflow demo",
    "test": 'pip install torch==2.13.0 && pip install -e ".[test]" && pytest',
    "tensorboard": "tensorboard --logdir ",
    "train_flux": "python tools/train.py configs/flux/",
    "train_override": "python tools/train.py configs/demo/",
    "torchrun_flux": "torchrun --nnodes=1 --nproc_per_node=4 tools/train.py configs/flux/",
    "torchrun_nodes": "torchrun --nnodes={num_of_nodes} ",
    "cache_flux": "torchrun --nnodes=1 --nproc_per_node=4 tools/cache_image_prompt_data.py configs/flux/",
    "cache_verify": "arcflow cache verify configs/flux/",
    "cache_qwen": "torchrun --nnodes=1 --nproc_per_node=4 tools/cache_image_prompt_data.py configs/qwen/",
    "torchrun_qwen": "torchrun --nnodes=1 --nproc_per_node=4 tools/train.py configs/qwen/",
    "export": "python tools/export_arcflow_to_diffusers.py ",
    "generate": "arcflow generate ",
    "app": "arcflow app ",
    "sample": "arcflow sample ",
    "eval_student": "arcflow eval configs/demo/teacher_arcflux_2nfe.py --ckpt ",
    "eval_baseline": "arcflow eval configs/demo/teacher_arcflux_2nfe.py --baseline-steps ",
}
"""Each README command this file runs, by name: how it starts, in README order."""


def command(name: str) -> str:
    """The README's command called ``name`` here."""
    (found,) = [line for line in COMMANDS if line.startswith(CHECKS[name])]
    return found


def test_every_readme_command_is_run_here() -> None:
    """A command added to the README without a check here fails, as does a check whose command is gone."""
    owners = [[name for name, start in CHECKS.items() if line.startswith(start)] for line in COMMANDS]
    assert all(len(owner) == 1 for owner in owners), [line for line, o in zip(COMMANDS, owners) if len(o) != 1]
    assert [owner[0] for owner in owners] == list(CHECKS)
    assert len(code_blocks("python")) == 1


def test_ci_runs_the_install_and_test_command_as_written() -> None:
    """``.ci/run`` executes the README's test command itself (read from the README, so the two cannot drift)."""
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "tools/readme_command.py test" in ci
    out = subprocess.run([sys.executable, "tools/readme_command.py", "test"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == command("test")
    demo = command("demo")
    assert demo.rsplit(" && ", 1)[0] == out.strip().replace('".[test]"', ".").rsplit(" && ", 1)[0]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh directory that looks like the checkout to the README's relative paths."""
    folder = tmp_path_factory.mktemp("readme")
    for name in ("configs", "tools", "assets"):
        (folder / name).symlink_to(ROOT / name)
    return folder


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def environment(**extra: str) -> dict[str, str]:
    """The hub offline, and torchrun's default port (PET_MASTER_PORT) a free one, as other jobs may hold 29500."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PET_MASTER_PORT": str(free_port()), **extra}
    env.pop("RANK", None)
    return env


def run(line: str, cwd: Path, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["bash", "-c", line], cwd=cwd, env=environment(), capture_output=True, text=True,
                          timeout=timeout)
    if check and done.returncode != 0:
        pytest.fail(f"README command failed ({done.returncode}): {line}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


@pytest.mark.parametrize("name, stop", [("train_flux", HUB_STOP), ("torchrun_flux", HUB_STOP),
                                        ("torchrun_nodes", HUB_STOP), ("cache_flux", PROMPTS_STOP),
                                        ("cache_qwen", PROMPTS_STOP), ("torchrun_qwen", QWEN_STOP)])
def test_hub_commands_stop_at_once_with_what_to_do(scratch: Path, name: str, stop: str) -> None:
    """Without the teacher (or its prompt set) on the machine, each command says so once, in one line."""
    line = command(name)
    if "{num_of_nodes}" in line:  # the multi-node template, filled in for one node
        line = (line.replace("{num_of_nodes}", "1").replace("{num_of_gpus_per_node}", "2")
                .replace("<NODE_RANK>", "0").replace("<MASTER_ADDR>", "127.0.0.1")
                .replace("<MASTER_PORT>", str(free_port())))
    done = run(line, scratch, timeout=600, check=False)
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert output.count(stop) == 1, output[-3000:]
    assert "[arcflow] rank" not in output and "arcflow/models" not in output  # no per-rank report, no traceback
    assert not list(scratch.glob("checkpoints/*/iter_*"))  # nothing was trained or saved


def test_cache_verify_names_what_is_missing(scratch: Path) -> None:
    done = run(command("cache_verify"), scratch, check=False)
    assert done.returncode == 1
    assert "data/t2i_prompts_3m/preproc_flux/train: absent; run tools/cache_image_prompt_data.py" in done.stderr


@pytest.fixture(scope="module")
def demo(scratch: Path) -> Path:
    """The first command's demo, as written, in the scratch directory."""
    done = run(command("demo").rsplit(" && ", 1)[1], scratch, timeout=1800)
    assert "| arcflow_student_2nfe | 2 |" in done.stdout
    assert (scratch / "checkpoints" / "teacher_arcflux_2nfe").is_dir()
    return scratch


def test_training_override_command(demo: Path) -> None:
    line = command("train_override")
    run(line, demo)
    work_dir = demo / line.split("--work-dir ")[1].split()[0]
    logged = [json.loads(row) for row in (work_dir / "metrics.jsonl").read_text().splitlines()]
    assert logged and all(np.isfinite(row["loss"]) for row in logged)
    assert (work_dir / "checkpoints").is_dir()


def serves(line: str, cwd: Path, url: str, timeout: float = 300) -> str:
    """Start a README server command, wait until ``url`` answers, return the page, stop the server."""
    server = subprocess.Popen(["bash", "-c", f"exec {line}"], cwd=cwd, env=environment(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert server.poll() is None, f"{line} exited:\n{server.stdout.read()[-3000:]}"
            try:
                with urllib.request.urlopen(url, timeout=5) as page:
                    return page.read().decode("utf-8", "replace")
            except OSError:
                time.sleep(1)
        pytest.fail(f"{line}: nothing served at {url} after {timeout} s")
    finally:
        server.terminate()
        server.wait(timeout=60)


def test_tensorboard_shows_the_run(demo: Path) -> None:
    port = free_port()
    page = serves(f"{command('tensorboard')} --port {port}", demo, f"http://127.0.0.1:{port}/data/runs")
    assert json.loads(page) == ["."]


@pytest.fixture(scope="module")
def exported(demo: Path) -> Path:
    run(command("export"), demo)
    adapter = demo / "adapters" / "arcflux-demo"
    config = json.loads((adapter / "arcflow_config.json").read_text())
    assert config["max_sequence_length"] == 32 and config["resolutions"] == [[64, 64]]
    return adapter


def test_generate_equals_sample_of_the_same_checkpoint(demo: Path, exported: Path) -> None:
    """The exported adapter through diffusers gives the trainer's own sample: same prompt, seed 0."""
    run(command("generate"), demo)
    run(command("sample"), demo)
    generated = np.asarray(grid_cell(demo / "grid.png", 0, 0), dtype=np.float64)
    sampled = np.asarray(Image.open(demo / "sample.png").convert("RGB"), dtype=np.float64)
    assert generated.shape == sampled.shape == (64, 64, 3)
    assert np.abs(generated - sampled).mean() < 1.0  # 8-bit images of the same float sample
    assert PROMPT in json.loads(Image.open(demo / "grid.png").text[GRID_INFO_KEY])["row_captions"][0]
    assert sampled.std() > 10  # a scene, not a blank image


def test_python_snippet_on_the_demo_teacher(demo: Path, exported: Path) -> None:
    (snippet,) = code_blocks("python")
    assert "import torch" in snippet and "dtype=torch.bfloat16" in snippet
    script = demo / "snippet.py"
    script.write_text(snippet.replace('"black-forest-labs/FLUX.1-dev"', '"assets/demo_teacher"'))
    run(f"{sys.executable} snippet.py", demo)
    circle = np.asarray(Image.open(demo / "circle.png").convert("RGB"), dtype=np.float64)
    assert circle.shape == (64, 64, 3) and circle.std() > 10


def test_app_serves_the_demo(demo: Path, exported: Path) -> None:
    line = command("app")
    page = serves(line, demo, "http://127.0.0.1:7860/")
    assert "gradio" in page.lower()


@pytest.mark.parametrize("name, sampler, folder", [("eval_student", "student_2nfe", "student"),
                                                  ("eval_baseline", "teacher_8step", "teacher_8step")])
def test_eval_commands_write_the_table(demo: Path, name: str, sampler: str, folder: str) -> None:
    done = run(command(name), demo)
    work_dir = demo / "work_dirs" / "teacher_arcflux_2nfe" / f"eval_{sampler}"
    metrics = json.loads((work_dir / "metrics.json").read_text())
    assert 0.0 <= metrics["prompt_accuracy"] <= 1.0 and metrics["latent_mse"] >= 0.0
    assert metrics["fid_teacher"] is None and "fid_teacher" in metrics["unavailable"]
    assert (work_dir / "table.md").read_text().strip() in done.stdout
    assert len(list((work_dir / "images" / folder).glob("*.png"))) == 64

