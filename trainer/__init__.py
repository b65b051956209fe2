"""Training orchestration: config, loop, evaluation and metrics."""
