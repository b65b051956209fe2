"""Zero-shot benchmarks: students and teachers on the standard depth benchmarks, one protocol, one table.

    python -m trainer.benchmark --model runs/demo/student_best --model teacher:small \\
        --suite nyu,kitti,eth3d,diode,sintel,da2k --root DATA_ROOT [--protocol disparity|depth] [--json out.json]
    accelerate launch -m trainer.benchmark ...   (the same table from N processes)

Prints one Markdown table (a row per model: AbsRel and delta1 per benchmark, DA-2K's pairwise
accuracy; then each student's gap to the first teacher) and writes every metric to --json.
The benchmarks' files are looked for in DATA_ROOT/<name>/ (README: "Zero-shot benchmarks");
all of them are checked before any model is loaded.

Exit codes: 0 the table was made; 1 a mistake in the arguments, a model that cannot be loaded,
missing or unreadable benchmark files, or a --json file in the way.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Optional

from core.cli import ArgumentParser, comma_choices
from trainer.console import output_path_problem, print_error, record_exit_code, say, setup_logging, shown_path
from core.errors import RunError
from trainer.benchmark.suites import BENCHMARKS, PROTOCOLS, PUBLISHED


def _parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m trainer.benchmark", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", required=True,
                        help="a student folder, an .onnx file, or teacher:small / teacher:<hub id or folder>; "
                             "repeat for several")
    parser.add_argument("--suite", default=",".join(PUBLISHED),
                        help=f"comma-separated benchmarks of {','.join(BENCHMARKS)} (default: the published ones, "
                             f"{','.join(PUBLISHED)})")
    parser.add_argument("--root", required=True, help="folder holding one sub-folder per benchmark (nyu/, kitti/, ...)")
    parser.add_argument("--protocol", choices=list(PROTOCOLS), default="disparity",
                        help="where the prediction is aligned to the ground truth (default: disparity)")
    parser.add_argument("--json", help="write every metric of every model and benchmark here")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    parser.add_argument("--teacher-size", type=int, default=518,
                        help="a teacher's shorter input side (default: 518, Depth Anything V2's own)")
    parser.add_argument("--limit", type=int, help="score only the first N samples of each benchmark (a quick check)")
    parser.add_argument("--num-workers", type=int, default=2, help="DataLoader workers per process (default: 2)")
    parser.add_argument("--verbose", action="store_true", help="also show the libraries' info messages")
    args = parser.parse_intermixed_args(argv)
    args.suite = comma_choices(parser, "--suite", args.suite, list(BENCHMARKS))
    if not args.suite:
        parser.error("--suite names no benchmark; choose from " + ", ".join(BENCHMARKS))
    return args


def _check_args(args: argparse.Namespace) -> None:
    """Every mistake in the arguments, found before any file is read."""
    if not Path(args.root).is_dir():
        raise RunError(f"--root {args.root}: no such folder")
    if args.json:
        json_path = Path(args.json)
        problem = output_path_problem(json_path, "--json")
        if problem:
            raise RunError(problem)
        if json_path.exists() and not args.overwrite:
            raise RunError(f"--json {json_path} exists; pass --overwrite to replace it, or choose another path")
    for flag, value, least in (("--limit", args.limit, 1), ("--num-workers", args.num_workers, 0)):
        if value is not None and value < least:
            raise RunError(f"{flag} {value} must be >= {least}")
    if args.teacher_size < 14 or args.teacher_size % 14:
        raise RunError(f"--teacher-size {args.teacher_size} must be a positive multiple of 14 (e.g. 518)")


def _plain_json(value):
    """`value` with every inf / NaN float as null (JSON has neither): an open depth range, a
    benchmark whose images had no valid pixel."""
    if isinstance(value, dict):
        return {key: _plain_json(item) for key, item in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _write_json(path: Path, report: dict) -> None:
    """Written beside the target and renamed into place: a crash never leaves half a file."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(_plain_json(report), indent=2, allow_nan=False) + "\n")
    os.replace(partial, path)


def run(args: argparse.Namespace) -> dict:
    from accelerate import Accelerator

    from trainer.benchmark.harness import BenchmarkDataset, format_table, gaps, run_benchmark
    from trainer.benchmark.models import load_benchmark_model
    from trainer.benchmark.readers import expected_count_note, open_reader
    from trainer.processes import check_world_size

    _check_args(args)
    root = Path(args.root)
    benchmarks = [BENCHMARKS[name] for name in args.suite]
    readers = {b.name: open_reader(b.name, root / b.name) for b in benchmarks}  # every file checked first
    accelerator = Accelerator()
    check_world_size(accelerator)
    try:
        models = [load_benchmark_model(spec, accelerator.device, args.teacher_size) for spec in args.model]
    except (ValueError, FileNotFoundError) as error:  # a student or ONNX file that cannot be loaded
        raise RunError(str(error)) from None
    if len({model.name for model in models}) < len(models):
        raise RunError("the same --model is given twice; give each model once")
    for benchmark in benchmarks:
        note = None if args.limit else expected_count_note(readers[benchmark.name], benchmark.images)
        if note:
            say(f"note: {note}")
    protocol = PROTOCOLS[args.protocol]
    results: dict[str, dict[str, dict[str, float]]] = {model.name: {} for model in models}
    for benchmark in benchmarks:
        dataset = BenchmarkDataset(readers[benchmark.name], benchmark, models, args.limit)
        for name, metrics in run_benchmark(accelerator, models, dataset, protocol, args.num_workers).items():
            results[name][benchmark.name] = metrics
    say(format_table(results, models, benchmarks, protocol))
    report = {
        "protocol": {"name": protocol.name, "definition": protocol.definition, "source": protocol.source},
        "benchmarks": {b.name: {"split": b.split, "min_depth": b.min_depth, "max_depth": b.max_depth, "crop": b.crop,
                                "source": b.source, "layout": readers[b.name].layout,
                                "folder": str(readers[b.name].folder.resolve())} for b in benchmarks},
        "models": {model.name: {"teacher": model.is_teacher, "input": model.input_note} for model in models},
        "results": results,
        "gaps": gaps(results, models),
    }
    if args.json and accelerator.is_main_process:
        _write_json(Path(args.json), report)
        say(f"wrote {shown_path(Path(args.json))}")
    return report


def main(argv: Optional[list[str]] = None) -> int:
    """Exit codes: 0 the table was made, 1 a mistake (one `error:` line)."""
    from trainer.benchmark.readers import BenchmarkDataError
    from trainer.config import ConfigError

    args = _parse_args(argv)
    setup_logging(args.verbose)
    try:
        run(args)
    except (ConfigError, RunError, BenchmarkDataError) as error:  # every loading error is a RunError
        print_error(str(error))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(record_exit_code(main()))
