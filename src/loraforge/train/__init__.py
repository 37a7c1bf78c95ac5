"""Train stage: the run orchestration (run), the loop (loop) and crash-safe checkpoints (checkpoint)."""
