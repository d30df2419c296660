# Prompts: one per line, or JSONL with "prompt" and optional "height"/"width".
data = dict(
    train=dict(prompt_file='data/prompts/train.jsonl', height=1024, width=1024),
    val=dict(prompt_file='data/prompts/val.jsonl', height=1024, width=1024))
val_cfg = dict(num_prompts=8, batch_size=4, teacher_steps=128, nfe=(2, ), seed=0)
