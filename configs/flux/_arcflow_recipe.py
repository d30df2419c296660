# The ArcFlow imitation rollout of the reference FLUX.1-dev run (SPEC §3-§4). The model's recipe
# (K, LoRA, guidance) is in the leaf config; how it trains (precision, memory) in _ddp_train.py.
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
