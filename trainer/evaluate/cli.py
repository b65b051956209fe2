"""Evaluate a trained student: against its teacher on photos, or against ground-truth depth.

    python -m trainer.evaluate --checkpoint runs/demo/student_best --data data/samples [--json m.json]
    accelerate launch -m trainer.evaluate --checkpoint DIR --data NYU_DIR --labeled --crop eigen_nyu

Here: the arguments, each checked before torch or a model library is imported, so that a mistake
answers at once (also on every process of a launch). Then trainer/evaluate/evaluation.py runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

from core.choices import ALIGN_MODES
from core.cli import ArgumentParser
from core.errors import RunError
from core.student_folder import student_folder_problem
from trainer.console import output_path_problem, print_error, setup_logging


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m trainer.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="student folder (config.json + model.safetensors)")
    parser.add_argument("--data", required=True, help="folder of photos, or of images/ + depth/ with --labeled")
    parser.add_argument("--labeled", action="store_true", help="compare with ground-truth depth")
    parser.add_argument("--config", help="run config for the teacher and sizes (default: the run's config.yaml)")
    parser.add_argument("--align", choices=list(ALIGN_MODES), default=None)
    parser.add_argument("--crop", choices=["eigen_nyu", "garg_kitti", "eigen_kitti"], default=None)
    parser.add_argument("--min-depth", type=float, default=None)
    parser.add_argument("--max-depth", type=float, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--json", help="write the averaged metrics here as one JSON object")
    parser.add_argument("--verbose", action="store_true", help="also show the libraries' info messages")
    return parser.parse_intermixed_args(argv)


def check_inputs(args: argparse.Namespace) -> None:
    """Every mistake in the arguments that a path shows, found before a library is imported."""
    problem = student_folder_problem(Path(args.checkpoint))
    if problem:
        raise RunError(problem)
    data = Path(args.data)
    if not data.is_dir():
        raise RunError(f"--data {data}: no such folder")
    if args.labeled:
        missing = [name for name in ("images", "depth") if not (data / name).is_dir()]
        if missing:
            raise RunError(f"--labeled: {data} must hold images/ and depth/ (missing: {', '.join(missing)})")
    if args.config and not Path(args.config).is_file():
        raise RunError(f"--config {args.config}: no such file")
    problem = output_path_problem(Path(args.json), "--json") if args.json else None
    if problem:
        raise RunError(problem)
    if args.batch_size is not None and args.batch_size < 1:
        raise RunError(f"--batch-size {args.batch_size} must be >= 1")


def main(argv: Optional[list[str]] = None) -> int:
    """Exit codes: 0 metrics computed, 1 a mistake in the arguments or data (one `error:` line)."""
    from trainer.config import ConfigError

    args = parse_args(argv)
    setup_logging(args.verbose)
    try:
        check_inputs(args)
        from trainer.evaluate.evaluation import run  # torch, the models, Accelerate: once the arguments hold
        run(args)
    except (ConfigError, RunError) as error:  # every loading error is a RunError
        print_error(str(error))
        return 1
    return 0
