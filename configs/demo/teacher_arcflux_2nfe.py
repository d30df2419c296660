# The demo recipe on the shipped trained teacher (assets/demo_teacher, reproduced by
# `python tools/train_demo_teacher.py assets/demo_teacher`): 64x64 synthetic scenes, 16 image tokens.
_base_ = ['./arcflux_tiny_2nfe.py']

model = dict(pretrained='assets/demo_teacher')
data = dict(
    train=dict(prompt_file='assets/demo_teacher/prompts.jsonl', height=64, width=64),
    val=dict(prompt_file='assets/demo_teacher/prompts.jsonl', height=64, width=64))
