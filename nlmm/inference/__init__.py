"""Checkpoints and what reads them: the checkpoint format (checkpoint), the weights cache,
loading a model for inference (load), file -> model input (embed), export and bundles."""
