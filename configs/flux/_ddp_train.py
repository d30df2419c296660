# Training schedule of the reference FLUX.1-dev run (SPEC §4), one process per GPU under DDP.
model = dict(
    dtype='bfloat16',  # frozen weights and compute; trainable parameters stay float32
    gradient_checkpointing=True,
    # Prompts are read from the embedding cache (tools/cache_image_prompt_data.py, data.data_root).
    # uncomment the following to use text encoder when training (prompts embedded on the fly, no cache)
    # text_encoder=dict(
    #     type='PretrainedFluxTextEncoder'
    # ),
)
optimizer = dict(
    type='AdamW8bit',  # bitsandbytes on CUDA; torch AdamW elsewhere
    lr=1e-4,
    betas=(0.9, 0.95),
    weight_decay=0.0,
    rates_lr_mult=0.1,
    warmup_iters=100,
    warmup_start_factor=0.001,
    grad_clip=50.0,
    grad_clip_start_iter=100)
ema = dict(gamma=7.0, start_iter=100)
train_cfg = dict(
    batch_size=4,  # images per GPU
    grad_accum_batch_size=None,  # 1: process the 4 images one at a time (same gradient, less memory)
    seed=42,
    parallel='ddp')
checkpoint = dict(keep_last=1, keep_every=1000)
work_dir = ''  # empty: work_dirs/{config name}
checkpoint_dir = ''  # empty: checkpoints/{config name}
total_iters = 10000
save_interval = 500
eval_interval = 500
log_interval = 1
