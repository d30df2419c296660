"""Prompt sets, the sharded prompt-embedding cache and bucketed distributed batches. Family-neutral: the text encoder decides what a conditioning holds."""
