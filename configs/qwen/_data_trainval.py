# FLUX's prompt data (configs/flux/_data_trainval.py) with the Qwen-Image embedding cache beside FLUX's:
# rows are Qwen2.5-VL's variable-length hidden states with their masks, and the empty prompt's embedding.
_base_ = ['../flux/_data_trainval.py']

data = dict(
    data_root='data/t2i_prompts_3m/preproc_qwen/',
    cache_storage='bf16')  # lossless for the bf16 encoder; 'fp8' (a scale per token) halves it
