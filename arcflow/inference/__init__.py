"""After training: export to a diffusers adapter, sampling from checkpoints, generating with the pipelines."""
