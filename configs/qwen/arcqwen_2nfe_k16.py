# ArcFlow distillation of Qwen-Image into a 2-NFE student with K = 16 momentum modes (SPEC §8).
# The teacher runs true CFG 4.0 against the empty prompt; the student gets the prompt alone.
# FSDP: replace './_ddp_train.py' with './_fsdp_train.py' below.
_base_ = ['../flux/_arcflow_recipe.py', './_ddp_train.py', './_data_trainval.py']

model = dict(
    backbone='qwen_image',
    pretrained='Qwen/Qwen-Image',  # hub id or a local diffusers folder
    num_modes=16,
    lora_rank=256,
    lora_alpha=256,
    lora_dropout=0.05,
    guidance=4.0,  # the teacher's true-CFG scale (Qwen-Image has no guidance embedding)
    cfg_renorm=False)  # True: QwenImagePipeline's rescale of the guided velocity to the conditional norm
distill = dict(nfe=2, teacher_ratio_decay_iters=1000)
