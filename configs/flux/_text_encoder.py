# FLUX.1-dev's text encoders (CLIP-L pooled + T5-XXL, 512 tokens) for
# tools/cache_image_prompt_data.py (--text-encoder); weights come from model.pretrained.
# The same dict under `model` in a training config embeds prompts on the fly instead.
model = dict(text_encoder=dict(type='PretrainedFluxTextEncoder', max_sequence_length=512))
