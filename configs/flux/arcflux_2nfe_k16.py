# ArcFlow distillation of FLUX.1-dev into a 2-NFE student with K = 16 momentum modes.
# FSDP: replace './_ddp_train.py' with './_fsdp_train.py' below.
_base_ = ['./_arcflow_recipe.py', './_ddp_train.py', './_data_trainval.py']

model = dict(
    backbone='flux',
    pretrained='black-forest-labs/FLUX.1-dev',  # hub id or a local diffusers folder
    num_modes=16,
    lora_rank=256,
    lora_alpha=256,
    lora_dropout=0.05,
    guidance=3.5)
distill = dict(nfe=2)
