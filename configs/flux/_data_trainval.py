# Prompt data (SPEC §5): pi-Flow's public prompt set, columns prompt/height/width; or a local
# file/folder (txt, jsonl, parquet, csv). tools/cache_image_prompt_data.py embeds it into the
# sharded cache under data_root; training reads the cache when it is complete, otherwise embeds
# on the fly with model.text_encoder (data.cache='never' forces that, 'always' forbids it).
data = dict(
    source='Lakonik/t2i-prompts-3m',
    data_root='data/t2i_prompts_3m/preproc_flux/',
    cache='auto',
    shard_size=2048,
    cache_storage='fp8',  # T5 is unmasked: all 512 rows are stored; fp8 halves the ~3 TB bf16 would take
    train=dict(end_ind=-128, height=1024, width=1024, bucketize=True),
    # The last 128 prompts, each with 2 fixed noises: comparable across iterations and runs.
    val=dict(start_ind=-128, repeat=2, height=1024, width=1024, bucketize=True))
val_cfg = dict(num_prompts=8, batch_size=4, teacher_steps=128, nfe=(2, ), seed=0)
