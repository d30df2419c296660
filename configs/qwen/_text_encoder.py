# Qwen-Image's text encoder (Qwen2.5-VL-7B's language model on the pipeline's chat template, at most
# 512 tokens) for tools/cache_image_prompt_data.py (--text-encoder); weights come from model.pretrained.
# The same dict under `model` in a training config embeds prompts on the fly instead.
model = dict(text_encoder=dict(type='PretrainedQwenImageTextEncoder', max_sequence_length=512))
