# ArcFlow distillation of FLUX.1-dev into a 2-NFE student with K = 16 momentum modes.
# FSDP: replace './_ddp_train.py' with './_fsdp_train.py' below.
_base_ = ['./_arcflow_recipe.py', './_ddp_train.py', './_data_trainval.py']

model = dict(
    num_modes=16,
    # Prompts are embedded on the fly by FLUX's CLIP + T5 encoders.
    text_encoder=dict(type='PretrainedFluxTextEncoder', max_sequence_length=512))
distill = dict(nfe=2)
