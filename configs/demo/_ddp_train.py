# The reference schedule scaled to a few minutes on a 2-core CPU.
_base_ = ['../flux/_ddp_train.py']

model = dict(
    dtype='float32',  # CPU
    gradient_checkpointing=False,
    # The demo embeds its prompts on the fly (a complete cache under data.data_root is read instead);
    # its tiny T5 was trained on 32 tokens.
    text_encoder=dict(
        type='PretrainedFluxTextEncoder',
        max_sequence_length=32
    ),
)
optimizer = dict(type='AdamW', lr=1e-3, warmup_iters=20, grad_clip_start_iter=20)
ema = dict(start_iter=20)
train_cfg = dict(batch_size=4)
checkpoint = dict(keep_last=2, keep_every=None)
total_iters = 300
save_interval = 100
eval_interval = 100
