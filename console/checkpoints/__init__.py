"""A run's checkpoints: their metrics, and evaluate, export, resume or search with one."""
