"""The evaluation protocol on the tiny FLUX: files, resume, the teacher store, ranks, adapters, and bad input.

These run without the metric libraries (they are reported unavailable, with the reason); the
libraries' own networks are exercised in tests/test_evaluation_metrics.py.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from arcflow.cli import main
from arcflow.config import EvalConfig, load_config, resolve_dirs
from arcflow.demo import synthetic
from arcflow.demo.scene_eval import held_out_captions, prompt_accuracy
from arcflow.evaluation.report import STANDARD_METRICS
from arcflow.evaluation.store import ImageStore, make_items, noise_for
from arcflow.metrics.suite import AlignmentMetric, MetricSuite, Pairs

REPO = Path(__file__).resolve().parents[1]
DEMO = "configs/demo/arcflux_tiny_2nfe.py"
CAPTIONS = ["a large red circle on the left on a white background", "two small blue squares on a black background",
            "a large red circle on the left on a white background",
            "a small green ring at the top on a grey background",
            "three small yellow triangles on a white background"]


def options(tiny: Path, store: Path, **extra) -> list[str]:
    values = {"model.pretrained": str(tiny), "eval_cfg.teacher_store": str(store), "eval_cfg.teacher_steps": 4,
              "eval_cfg.height": 64, "eval_cfg.width": 64, "eval_cfg.batch_size": 5,
              "eval_cfg.hooks": "[arcflow.demo.scene_eval:prompt_accuracy]", **extra}
    return ["--cfg-options", *[f"{k}={v}" for k, v in values.items()]]


@pytest.fixture(scope="module")
def trained(tiny_flux_dir, tmp_path_factory) -> dict[str, Path]:
    """A 2-iteration tiny student and a prompt file of scene captions (one repeated)."""
    root = tmp_path_factory.mktemp("eval")
    main(["train", str(REPO / DEMO), "--work-dir", str(root / "run"), "--cfg-options",
          f"model.pretrained={tiny_flux_dir}", "data.cache=never", "train_cfg.batch_size=2", "total_iters=2",
          "eval_interval=0", "save_interval=2"])
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(CAPTIONS) + "\n")
    return {"run": root / "run", "prompts": prompts, "tiny": tiny_flux_dir}


def evaluate(trained: dict[str, Path], work_dir: Path, store: Path, *args: str, **extra) -> dict:
    main(["eval", str(REPO / DEMO), *args, "--prompts", str(trained["prompts"]), "--work-dir", str(work_dir),
          *options(trained["tiny"], store, **extra)])
    return json.loads((work_dir / "metrics.json").read_text())


def mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if p.suffix in (".png", ".safetensors")}


def test_eval_writes_every_output_resumes_and_reuses_the_teacher(trained, tmp_path):
    work, store = tmp_path / "eval", tmp_path / "store"
    metrics = evaluate(trained, work, store, "--ckpt", str(trained["run"]))

    assert set(STANDARD_METRICS) <= set(metrics)
    assert metrics["fid_teacher"] is None and metrics["unavailable"]["fid_teacher"]  # no weights here: a reason
    assert metrics["clip_score"] is None and "clip_score" in metrics["unavailable"]
    assert metrics["images_per_s_student"] > 0 and metrics["images_per_s_teacher"] > 0
    assert 0 <= metrics["prompt_accuracy"] <= 1 and 0 <= metrics["prompt_accuracy_teacher"] <= 1
    students = ImageStore(work / "images" / "student")
    assert sorted(p.name for p in students.root.glob("*.png")) == [f"{i:05d}.png" for i in range(5)]
    [teacher_dir] = [p for p in store.iterdir() if p.is_dir()]
    teachers = ImageStore(teacher_dir)
    items = make_items([(c, 64, 64) for c in CAPTIONS])
    assert items[0].key != items[2].key and len(list(teacher_dir.glob("*.png"))) == 5  # the repeat has its own noise
    direct = np.mean([float((students.read(it.name)[1] - teachers.read(it.key)[1]).pow(2).mean()) for it in items])
    assert metrics["latent_mse"] == pytest.approx(direct, rel=1e-6)
    assert (work / "grid.png").is_file() and "| latent_mse |" in (work / "table.md").read_text()
    run = json.loads((work / "run.json").read_text())
    assert run["candidate"] == "student_2nfe" and run["reference"] == "teacher_4step" and run["commit"]

    # A killed run: one student image never made. The rerun makes that one only.
    (work / "images" / "student" / "00002.png").unlink()
    before_students, before_teachers = mtimes(students.root), mtimes(teacher_dir)
    again = evaluate(trained, work, store, "--ckpt", str(trained["run"]))
    after = mtimes(students.root)
    assert sorted(name for name in after if after[name] != before_students.get(name)) == [
        "00002.latent.safetensors", "00002.png"]
    assert mtimes(teacher_dir) == before_teachers
    assert again["latent_mse"] == pytest.approx(metrics["latent_mse"], rel=1e-6)

    # A teacher baseline in another work dir reuses the stored teacher images (same model, sampler, seed).
    baseline = evaluate(trained, tmp_path / "baseline", store, "--baseline-steps", "2")
    assert mtimes(teacher_dir) == before_teachers
    assert baseline["latent_mse"] > 0 and baseline["prompt_accuracy_teacher"] == metrics["prompt_accuracy_teacher"]


def test_images_do_not_depend_on_batching_or_ranks(trained, tmp_path):
    one = tmp_path / "one"
    evaluate(trained, one, tmp_path / "store_one", "--ckpt", str(trained["run"]), **{"eval_cfg.batch_size": 2})
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "tools/test.py",
           str(REPO / DEMO), "--ckpt", str(trained["run"]), "--launcher", "pytorch",
           "--prompts", str(trained["prompts"]),
           "--work-dir", str(two), *options(trained["tiny"], tmp_path / "store_two")]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    for index in range(len(CAPTIONS)):
        a = load_file(str(one / "images" / "student" / f"{index:05d}.latent.safetensors"))["latent"]
        b = load_file(str(two / "images" / "student" / f"{index:05d}.latent.safetensors"))["latent"]
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    first, second = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert json.loads((two / "run.json").read_text())["world_size"] == 2
    assert second["latent_mse"] == pytest.approx(first["latent_mse"], rel=1e-3)
    assert second["prompt_accuracy"] == first["prompt_accuracy"]


def test_an_exported_adapter_is_the_checkpoint_student(trained, tmp_path):
    from arcflow.inference.export import export_adapter
    from arcflow.inference.student import load_adapter_student, load_ema_student

    cfg = resolve_dirs(load_config(REPO / DEMO, {"model.pretrained": str(trained["tiny"])}), str(trained["run"]))
    adapter = export_adapter(cfg, trained["run"], tmp_path / "adapter", "float32")
    from_ckpt = dict(load_ema_student(cfg, trained["run"], torch.device("cpu"))[0].trainable_named_parameters())
    from_adapter = dict(load_adapter_student(cfg, adapter, torch.device("cpu"))[0].trainable_named_parameters())
    assert from_ckpt.keys() == from_adapter.keys()
    assert all(torch.equal(from_ckpt[k], from_adapter[k]) for k in from_ckpt)
    metrics = evaluate(trained, tmp_path / "eval", tmp_path / "store", "--adapter", str(adapter),
                       **{"eval_cfg.metrics": "[alignment]", "eval_cfg.num_prompts": 2})
    assert metrics["latent_mse"] > 0 and json.loads((tmp_path / "eval" / "run.json").read_text())["num_prompts"] == 2


def test_bad_input_fails_before_any_model_is_loaded(trained, tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        evaluate(trained, tmp_path / "a", tmp_path / "s", "--ckpt", str(tmp_path / "missing"))
    with pytest.raises(SystemExit, match="^arcflow: error: config key .eval_cfg.metrics"):  # one line
        evaluate(trained, tmp_path / "b", tmp_path / "s", "--ckpt", str(trained["run"]),
                 **{"eval_cfg.metrics": "[fdi]"})
    with pytest.raises(ValueError, match="nfe must be >= 2"):
        evaluate(trained, tmp_path / "c", tmp_path / "s", "--ckpt", str(trained["run"]), "--nfe", "1")
    with pytest.raises(SystemExit):
        main(["eval", str(REPO / DEMO), "--ckpt", "a", "--adapter", "b"])
    assert not (tmp_path / "s").exists()


def test_store_writes_atomically_refuses_non_finite_and_checks_its_key(tmp_path):
    store = ImageStore(tmp_path / "s", {"sampler": "euler50"})
    image = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    store.write("a", image, torch.randn(16, 2, 2))
    got, latent = store.read("a")
    assert torch.equal(got, image) and latent.shape == (16, 2, 2) and store.has("a")
    with pytest.raises(ValueError, match="non-finite"):
        store.write("b", image, torch.full((16, 2, 2), float("nan")))
    assert not store.has("b") and not list(store.root.glob(".*tmp"))
    with pytest.raises(ValueError, match="was made by"):
        ImageStore(tmp_path / "s", {"sampler": "euler8"})


def test_noise_is_a_function_of_the_prompt_not_its_position():
    items = make_items([("a cat", 64, 64), ("a dog", 64, 64), ("a cat", 64, 64)])
    alone = make_items([("a dog", 64, 64)])
    torch.testing.assert_close(noise_for(items[1], 0, (4, 2, 2)), noise_for(alone[0], 0, (4, 2, 2)))
    assert not torch.equal(noise_for(items[0], 0, (4, 2, 2)), noise_for(items[2], 0, (4, 2, 2)))
    assert not torch.equal(noise_for(items[0], 0, (4, 2, 2)), noise_for(items[0], 1, (4, 2, 2)))


def test_scene_hook_reads_rendered_captions_back():
    scenes = [synthetic.make_scene(1, index) for index in range(24)]
    assert all(synthetic.parse_caption(s.caption).caption == s.caption for s in scenes)
    images = torch.stack([torch.from_numpy(np.asarray(synthetic.render(s))).permute(2, 0, 1) for s in scenes])
    scores = prompt_accuracy([s.caption for s in scenes], images)
    assert scores["prompt_accuracy"].mean() > 0.9 and scores["colour_accuracy"].shape == (24,)
    shuffled = prompt_accuracy([s.caption for s in scenes[1:] + scenes[:1]], images)
    assert shuffled["prompt_accuracy"].mean() < 0.5
    with pytest.raises(ValueError, match="not a synthetic scene caption"):
        synthetic.parse_caption("a photo of a cat")


def test_demo_eval_prompts_are_the_held_out_scenes():
    rows = [json.loads(line) for line in (REPO / "assets/demo_teacher/eval_prompts.jsonl").read_text().splitlines()]
    assert [row["prompt"] for row in rows] == held_out_captions(256)
    assert {(row["height"], row["width"]) for row in rows} == {(64, 64)}


def test_alignment_is_latent_mse_and_psnr_of_the_pairs():
    candidate = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    reference = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    latents = torch.randn(2, 3, 4, 2, 2)
    suite = MetricSuite([AlignmentMetric()], {"lpips": "lpips is not importable"})
    suite.update(Pairs(["a"] * 3, candidate, reference, latents[0], latents[1]))
    values, reasons = suite.compute(suite.state())
    assert values["latent_mse"] == pytest.approx(float((latents[0] - latents[1]).pow(2).mean()), rel=1e-6)
    mse = ((candidate.double() - reference.double()) / 255).pow(2).flatten(1).mean(1)
    assert values["psnr"] == pytest.approx(float((10 * torch.log10(1 / mse)).mean()), rel=1e-5)
    assert values["lpips"] is None and reasons["lpips"] == "lpips is not importable"


def test_eval_config_rejects_bad_values():
    with pytest.raises(ValueError, match="eval_cfg.patch_size"):
        EvalConfig(patch_size=0)
    with pytest.raises(ValueError, match="eval_cfg.hooks"):
        EvalConfig(hooks=("no_colon",))
