# The FLUX recipe on the tiny FLUX-architecture model made by `arcflow tiny-flux data/demo/tiny-flux`.
_base_ = ['../flux/_arcflow_recipe.py', './_ddp_train.py', './_data_trainval.py']

model = dict(
    pretrained='data/demo/tiny-flux',
    lora_rank=8,
    lora_alpha=8,
    dtype='float32',  # CPU
    gradient_checkpointing=False,
    text_encoder=dict(type='PretrainedFluxTextEncoder', max_sequence_length=32))
distill = dict(nfe=2, teacher_ratio_decay_iters=100)
