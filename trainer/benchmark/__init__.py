"""Zero-shot benchmarks: students and teachers on NYUv2, KITTI, ETH3D, DIODE, Sintel and DA-2K by a
written-down protocol (`python -m trainer.benchmark`). suites.py holds the benchmarks' ranges,
crops and sources and the two protocols; readers.py the file formats; models.py what a --model
is; harness.py the exact multi-process scoring and the table."""
