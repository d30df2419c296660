# The ArcFlow recipe on FLUX.1-dev (SPEC §2-§4): model, adapters and the imitation rollout.
model = dict(
    backbone='flux',
    pretrained='black-forest-labs/FLUX.1-dev',  # hub id or a local diffusers folder
    num_modes=16,
    lora_rank=256,
    lora_alpha=256,
    lora_dropout=0.05,
    guidance=3.5,
    dtype='bfloat16',  # frozen weights and compute; trainable parameters stay float32
    gradient_checkpointing=True)

distill = dict(
    nfe=2,
    timestep_ratio=1.0,
    shift=3.2,
    teacher_ratio_decay_iters=2000,
    num_states=4,
    window_substeps=3,
    total_substeps=128,
    dropout=0.1,
    loss_scale=30.0)
