"""Benchmarks: `python -m bench.train_step`, `python -m bench.inference`, `python -m bench.dataloader`.

Each prints one table and, with `--json PATH`, writes its figures; bench/RESULTS.md holds the
measured tables. Targets are ratios measured within one run, never absolute times.
"""
