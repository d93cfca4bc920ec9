"""Training: loop, losses wiring, retrieval metrics, checkpoints, launcher, worker entry point."""
