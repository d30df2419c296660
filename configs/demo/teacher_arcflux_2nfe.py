# `arcflow demo`: the demo recipe on the shipped trained teacher (assets/demo_teacher, 64x64 synthetic
# scenes, 16 image tokens; made by `python tools/train_demo_teacher.py assets/demo_teacher`).
# Its prompt file lists the training captions, then 8 held-out ones for validation.
_base_ = ['./arcflux_tiny_2nfe.py']

model = dict(pretrained='assets/demo_teacher')
data = dict(
    source='assets/demo_teacher/prompts.jsonl',
    data_root='data/demo/preproc_demo_teacher/',
    train=dict(height=64, width=64),
    val=dict(height=64, width=64))
