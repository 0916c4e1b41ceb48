"""Training: stage configs, initialization, parallelization, the loop, checkpoints, export."""
