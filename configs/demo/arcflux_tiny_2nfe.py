# The FLUX recipe on the tiny FLUX-architecture model made by `arcflow tiny-flux data/demo/tiny-flux`.
# FSDP: replace './_ddp_train.py' with './_fsdp_train.py' below.
_base_ = ['../flux/_arcflow_recipe.py', './_ddp_train.py', './_data_trainval.py']

model = dict(pretrained='data/demo/tiny-flux', num_modes=16, lora_rank=8, lora_alpha=8)
distill = dict(nfe=2, teacher_ratio_decay_iters=100)
