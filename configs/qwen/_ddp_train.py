# Training schedule of the reference Qwen-Image run (SPEC §8): FLUX's (SPEC §4) for 15000 iterations,
# validation every 400, checkpoints every 500 (the last 2 kept, plus one every 1500).
_base_ = ['../flux/_ddp_train.py']

model = dict(
    # Prompts are read from the embedding cache (tools/cache_image_prompt_data.py, data.data_root).
    # uncomment the following to use text encoder when training (prompts embedded on the fly, no cache)
    # text_encoder=dict(
    #     type='PretrainedQwenImageTextEncoder'
    # ),
)
checkpoint = dict(keep_last=2, keep_every=1500)
total_iters = 15000
save_interval = 500
eval_interval = 400
