# The demo's prompt set: a small JSONL shipped in the repo, with mixed image sizes (aspect-ratio
# buckets). Same shape as configs/flux/_data_trainval.py: the cache tool writes under data_root,
# and training reads the cache when it is complete (else embeds on the fly, model.text_encoder).
data = dict(
    source='assets/demo/prompts.jsonl',
    data_root='data/demo/preproc_tiny_flux/',
    cache='auto',
    shard_size=16,
    train=dict(end_ind=-8, height=128, width=128, bucketize=True),
    # The last 8 prompts with fixed noise (the FLUX config: the last 128, twice each).
    val=dict(start_ind=-8, repeat=1, height=128, width=128, bucketize=True))
val_cfg = dict(num_prompts=8, batch_size=8, teacher_steps=128, nfe=(2, ), seed=0)
