# `arcflow demo`: the demo recipe on the shipped trained teacher (assets/demo_teacher, 64x64 synthetic
# scenes, 16 image tokens; made by `python tools/train_demo_teacher.py assets/demo_teacher`).
# Its prompt file lists the training captions, then 8 held-out ones for validation.
# FSDP: replace './_ddp_train.py' with './_fsdp_train.py' below.
_base_ = ['../flux/_arcflow_recipe.py', './_ddp_train.py', './_data_trainval.py']

model = dict(pretrained='assets/demo_teacher', num_modes=16, lora_rank=8, lora_alpha=8)
distill = dict(nfe=2, teacher_ratio_decay_iters=100)
data = dict(
    source='assets/demo_teacher/prompts.jsonl',
    data_root='data/demo/preproc_demo_teacher/',
    train=dict(height=64, width=64),
    val=dict(height=64, width=64))
# `arcflow eval`: 64 held-out scene captions (256 in the file) against the teacher's own 50-step samples;
# the scene detector reads colour, shape, count and position back (prompt_accuracy). FID, CLIP and LPIPS
# are reported unavailable unless their libraries and weights are on the machine.
eval_cfg = dict(
    prompts='assets/demo_teacher/eval_prompts.jsonl',
    num_prompts=64,
    height=64,
    width=64,
    batch_size=64,
    feature_batch_size=64,
    teacher_store='data/demo/eval_teacher',
    hooks=('arcflow.demo.scene_eval:prompt_accuracy', ))
