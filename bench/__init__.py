"""Benchmarks: `python -m bench.train_step`, `python -m bench.inference`, `python -m bench.dataloader`;
the quality run, `python -m bench.quality`, and the world teacher it distils, `python -m bench.world_teacher`.

Each prints one table and, with `--json PATH`, writes its figures; bench/RESULTS.md holds the
measured tables. Targets are ratios measured within one run, never absolute times.
"""
