# The demo schedule under FSDP2 (swap './_ddp_train.py' for './_fsdp_train.py' in the demo config).
_base_ = ['./_ddp_train.py']

train_cfg = dict(parallel='fsdp')
