# The reference schedule scaled to a few minutes on a 2-core CPU.
_base_ = ['../flux/_ddp_train.py']

optimizer = dict(type='AdamW', lr=1e-3, warmup_iters=20, grad_clip_start_iter=20)
ema = dict(start_iter=20)
train_cfg = dict(batch_size=4)
checkpoint = dict(keep_last=2, keep_every=None)
total_iters = 300
save_interval = 100
eval_interval = 100
