"""Stage 2, evaluate: metrics, the evaluation pass the loop and `python -m trainer.evaluate` run,
and the pictures TensorBoard shows. (Nothing is imported here: the configuration imports the
metric names from this package.)"""
