# The Qwen-Image recipe (configs/qwen/arcqwen_2nfe_k16.py) on the tiny Qwen-Image-architecture model made
# by `arcflow tiny data/demo/tiny-qwen-image --family qwen_image`: the code paths, not the images.
# FSDP: replace './_ddp_train.py' with './_fsdp_train.py' below.
_base_ = ['../flux/_arcflow_recipe.py', './_ddp_train.py', './_data_trainval.py']

model = dict(backbone='qwen_image', pretrained='data/demo/tiny-qwen-image', num_modes=16, lora_rank=8, lora_alpha=8,
             guidance=4.0, text_encoder=dict(type='PretrainedQwenImageTextEncoder'))
distill = dict(nfe=2, teacher_ratio_decay_iters=100)
data = dict(data_root='data/demo/preproc_tiny_qwen/')
