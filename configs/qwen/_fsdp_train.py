# The reference Qwen-Image schedule under FSDP2: weights, gradients and optimizer state sharded per block.
_base_ = ['./_ddp_train.py']

optimizer = dict(type='AdamW')  # state is sharded already; 8-bit AdamW does not take DTensors
train_cfg = dict(parallel='fsdp')
