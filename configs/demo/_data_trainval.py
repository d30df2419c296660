data = dict(
    train=dict(prompt_file='assets/demo/prompts.jsonl', height=128, width=128, end_ind=-8),
    val=dict(prompt_file='assets/demo/prompts.jsonl', height=128, width=128, start_ind=-8))
val_cfg = dict(num_prompts=8, batch_size=8, teacher_steps=128, nfe=(2, ), seed=0)
