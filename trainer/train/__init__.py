"""Stage 1, train: the loop and its step, what it trains on, the distillation module, checkpoints,
the run folder, the teacher cache writer, and fault injection for the reliability tests."""
