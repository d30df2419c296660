"""Config files, overrides and the error a user sees for a misspelt key."""

import argparse
import dataclasses
import shutil
from pathlib import Path

import pytest

from arcflow.config import load_config, resolve_dirs
from arcflow.models import get_family

FLUX = "configs/flux/arcflux_2nfe_k16.py"
DEMO = "configs/demo/arcflux_tiny_2nfe.py"
REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_flux_config_has_the_reference_recipe():
    cfg = load_config(FLUX)
    assert cfg.model.pretrained == "black-forest-labs/FLUX.1-dev"
    m = cfg.model
    assert (m.num_modes, m.lora_rank, m.lora_alpha, m.lora_dropout) == (16, 256, 256, 0.05)
    d = cfg.distill
    assert (d.nfe, d.shift, d.num_states, d.window_substeps, d.total_substeps, d.dropout, d.loss_scale) == \
        (2, 3.2, 4, 3, 128, 0.1, 30.0)
    assert d.teacher_ratio_decay_iters == 2000
    o = cfg.optimizer
    assert (o.lr, o.betas, o.weight_decay, o.rates_lr_mult, o.warmup_iters, o.grad_clip) == \
        (1e-4, (0.9, 0.95), 0.0, 0.1, 100, 50.0)
    assert (cfg.ema.gamma, cfg.ema.start_iter) == (7.0, 100)
    assert (cfg.total_iters, cfg.save_interval, cfg.eval_interval, cfg.train_cfg.batch_size) == (10000, 500, 500, 4)
    assert cfg.model.text_encoder is None  # the seed's default: the cache; _ddp_train.py has the switch


def test_demo_differs_from_flux_only_in_model_location_and_size():
    flux, demo = load_config(FLUX), load_config(DEMO)
    assert demo.model.pretrained == "data/demo/tiny-flux"
    assert demo.distill.nfe == flux.distill.nfe and demo.model.num_modes == flux.model.num_modes
    assert demo.distill.total_substeps == flux.distill.total_substeps


def test_cfg_options_override_any_key():
    cfg = load_config(DEMO, {"optimizer.lr": 5e-5, "train_cfg.batch_size": 2, "distill.nfe": 3})
    assert (cfg.optimizer.lr, cfg.train_cfg.batch_size, cfg.distill.nfe) == (5e-5, 2, 3)


@pytest.mark.parametrize("key,suggestion", [("optimizer.lrr", "optimizer.lr"), ("distil.nfe", "distill"),
                                            ("train_cfg.batchsize", "train_cfg.batch_size")])
def test_unknown_key_names_key_and_nearest(key, suggestion):
    with pytest.raises(ValueError) as err:
        load_config(DEMO, {key: 1})
    assert key.split(".")[0] in str(err.value) and suggestion in str(err.value)


def test_wrong_type_names_the_key():
    with pytest.raises(ValueError, match="train_cfg.batch_size"):
        load_config(DEMO, {"train_cfg.batch_size": "four"})


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="nope.py"):
        load_config("configs/nope.py")


def test_directories_default_and_work_dir():
    cfg = resolve_dirs(load_config(DEMO), None)
    assert (cfg.work_dir, cfg.checkpoint_dir) == ("work_dirs/arcflux_tiny_2nfe", "checkpoints/arcflux_tiny_2nfe")
    cfg = resolve_dirs(load_config(DEMO), "/tmp/run_a")
    assert (cfg.work_dir, cfg.checkpoint_dir) == ("/tmp/run_a", "/tmp/run_a/checkpoints")


SHIPPED = sorted(REPO_CONFIGS.glob("*/*.py"))
LEAVES = [path for path in SHIPPED if not path.name.startswith("_")]


def _name(path: Path) -> str:
    return f"{path.parent.name}/{path.name}"


def _swap_copy(tmp_path: Path, leaf: Path, old: str, new: str) -> Path:
    """A copy of configs/ in which ``leaf`` has ``old`` replaced by ``new`` as plain text (what a user does)."""
    root = tmp_path / "configs"
    shutil.copytree(REPO_CONFIGS, root)
    copy = root / leaf.parent.name / leaf.name
    text = copy.read_text()
    assert old in text, f"{_name(leaf)} does not contain {old!r}"
    copy.write_text(text.replace(old, new))
    return copy


@pytest.mark.parametrize("path", SHIPPED, ids=_name)
def test_every_shipped_config_loads(path):
    load_config(path)


@pytest.mark.parametrize("leaf", LEAVES, ids=_name)
def test_fsdp_switch_by_string_replacement_on_every_config(leaf, tmp_path):
    """The seed's switch: replace './_ddp_train.py' with './_fsdp_train.py' in the config's _base_."""
    ddp = load_config(leaf)
    assert ddp.train_cfg.parallel == "ddp"
    fsdp = load_config(_swap_copy(tmp_path, leaf, "'./_ddp_train.py'", "'./_fsdp_train.py'"))
    assert fsdp.train_cfg.parallel == "fsdp"
    expected = dataclasses.replace(ddp, train_cfg=dataclasses.replace(ddp.train_cfg, parallel="fsdp"),
                                   optimizer=dataclasses.replace(ddp.optimizer, type=fsdp.optimizer.type))
    assert fsdp == expected  # nothing else changes
    assert fsdp.optimizer.type == "AdamW"  # 8-bit AdamW takes no DTensors


def _uncomment_text_encoder(text: str) -> str:
    """The seed's other switch: uncomment the commented ``text_encoder=dict(...)`` lines of a training base config."""
    lines, out, inside = text.splitlines(), [], False
    for line in lines:
        stripped = line.lstrip()
        if stripped.startswith("# text_encoder=dict("):
            inside = True
        if inside:
            indent = line[:len(line) - len(stripped)]
            line = indent + stripped.removeprefix("# ")
            inside = not stripped.startswith("# )")
        out.append(line)
    return "\n".join(out) + "\n"


@pytest.mark.parametrize("leaf", LEAVES, ids=_name)
def test_text_encoder_switch_is_in_the_training_base_config(leaf, tmp_path):
    """Each config trains from the cache unless its training base config embeds prompts on the fly; where it
    does not, the base carries the lines to uncomment, and uncommenting them is enough."""
    base = leaf.parent / "_ddp_train.py"
    cfg = load_config(leaf)
    if cfg.model.text_encoder is not None:
        assert "text_encoder=dict(" in base.read_text()  # on the fly, and said so where the seed looks
        return
    text = base.read_text()
    assert "# uncomment the following to use text encoder when training" in text
    root = tmp_path / "configs"
    shutil.copytree(REPO_CONFIGS, root)
    (root / leaf.parent.name / base.name).write_text(_uncomment_text_encoder(text))
    switched = load_config(root / leaf.parent.name / leaf.name)
    assert switched.model.text_encoder is not None
    assert switched.model.text_encoder.type == get_family(switched.model.backbone).default_text_encoder
    assert dataclasses.replace(switched, model=dataclasses.replace(switched.model, text_encoder=None)) == cfg


def test_cli_help_lists_every_command_and_every_default(capsys):
    """``arcflow --help``: one line per command; each option's help says what it does and its default."""
    from arcflow.cli import HelpFormatter, build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    listing = parser.format_help()
    for name, sub in commands.choices.items():
        line = next((text for text in listing.splitlines() if text.strip().startswith(name + " ")), None)
        assert line is not None and len(line.split(name, 1)[1].strip()) > 10, f"'{name}' has no one-line help"
        formatter = HelpFormatter(sub.prog)
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            where = f"arcflow {name} {'/'.join(action.option_strings) or action.dest}"
            assert action.help, f"{where} has no help text"
            one_of_required = any(action in group._group_actions and group.required
                                  for group in sub._mutually_exclusive_groups)
            if action.option_strings and not action.required and not one_of_required:
                assert "default" in formatter._get_help_string(action), f"{where} does not say its default"


def test_demo_inputs_are_found_from_any_directory(tmp_path, monkeypatch):
    from arcflow.cli import DEMO_CONFIG, demo_inputs

    monkeypatch.chdir(tmp_path)
    config, options = demo_inputs(DEMO_CONFIG, {"total_iters": 3})
    cfg = load_config(config, options)
    repo = REPO_CONFIGS.parent
    assert Path(cfg.model.pretrained) == repo / "assets/demo_teacher"
    assert Path(cfg.data.train.source) == Path(cfg.data.val.source) == repo / "assets/demo_teacher/prompts.jsonl"
    assert cfg.total_iters == 3 and cfg.data.data_root == "data/demo/preproc_demo_teacher/"  # outputs stay here
    monkeypatch.chdir(repo)
    assert demo_inputs(DEMO_CONFIG, {}) == (DEMO_CONFIG, {})  # in the repository nothing changes
