# Text encoders of the tiny FLUX for tools/cache_image_prompt_data.py (--text-encoder); the same
# dict under `model` in a training config embeds prompts on the fly instead of reading the cache.
model = dict(text_encoder=dict(type='PretrainedFluxTextEncoder', max_sequence_length=32))
