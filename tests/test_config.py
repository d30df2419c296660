"""Config files, overrides and the error a user sees for a misspelt key."""

import pytest

from arcflow.config import load_config, resolve_dirs

FLUX = "configs/flux/arcflux_2nfe_k16.py"
DEMO = "configs/demo/arcflux_tiny_2nfe.py"


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
    assert cfg.model.text_encoder.type == "PretrainedFluxTextEncoder"


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
