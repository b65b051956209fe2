"""Distil a frozen Depth Anything V2 teacher into a phone-sized student, then ship it as ONNX.

    ./launch.sh --config trainer/configs/demo.yaml [section.key=value ...] [--overwrite] [--verbose]
    accelerate launch trainer/main.py --config FILE --resume latest     # continue a run, as saved

Here: parse and check the configuration, before torch or a model library is imported (so `--help`
and a mistake answer at once). Then `trainer/train/run.py`, read top to bottom: build data, models,
loss and optimizer, hand what trains to Accelerate, run the loop, export at the end.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):  # `accelerate launch trainer/main.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.cli import ArgumentParser
from core.errors import AgreedRunError, RunError
from trainer.config import Config, ConfigError, load_config, resume_config
from trainer.console import (EXIT_INTERRUPTED_EARLY, EXIT_SETUP, launched_rank, print_error, record_exit_code,
                             register_with_launcher, setup_logging)
from trainer.processes import die_with_launcher


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = ArgumentParser(prog="trainer/main.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML preset, e.g. trainer/configs/demo.yaml (a resumed run uses its saved "
                                         "config.yaml; --config then only locates the run)")
    parser.add_argument("--resume", help="'latest', a run folder (runs/NAME) or a training-state folder "
                                         "(runs/NAME/checkpoints/step_XXXXXXXX)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in an output_dir holding a run (deletes only that run's own outputs)")
    parser.add_argument("--verbose", action="store_true", help="also show the libraries' info messages")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. optim.lr=3e-4")
    # Intermixed: `--config X run_name=a --overwrite data.train_dir=b` reads as a user means it.
    return parser.parse_intermixed_args(argv)


def resolve_config(args: argparse.Namespace) -> tuple[Config, Optional[str], list[str]]:
    """-> (configuration, what to resume from or None, messages for the user).

    A new run reads --config and the overrides. A resumed run is the run that was saved: its own
    config.yaml, plus only those overrides that do not change what it trains (`RESUMABLE_KEYS`)."""
    given = load_config(args.config, args.overrides) if args.config else None
    if not args.resume:
        if given is None:
            raise ConfigError("--config FILE is required to start a run, e.g. --config trainer/configs/demo.yaml")
        return given, None, []
    # A resumed run: the run folder's helpers (they load Accelerate) only now.
    from trainer.train.run_dir import CONFIG_FILE, check_run_dir, locate_resumed_run

    run_dir, resume = locate_resumed_run(args.resume, given)
    check_run_dir(run_dir, args.resume, overwrite=False)  # a folder holding no run is refused here
    cfg, changes, ignored = resume_config(run_dir / CONFIG_FILE, args.overrides, given)
    cfg.output_dir = str(run_dir)  # the run is where it was found, even if its folder was moved
    messages = [f"resuming with the run's saved configuration {run_dir / CONFIG_FILE}"]
    messages += [f"changed on resume: {change}" for change in changes]
    if ignored:
        messages.append(f"ignored: --config {args.config} differs from the saved run in {', '.join(ignored)} "
                        f"(a resumed run keeps its configuration; pass an override to change an allowed key)")
    return cfg, resume, messages


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    # Until the loop takes SIGTERM over (a flag, then a saved state), it ends set-up like Ctrl-C:
    # one line and a recorded exit code, not a silent death the launcher would report at length.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    register_with_launcher()
    die_with_launcher()
    try:
        cfg, resume, messages = resolve_config(args)
        from trainer.train.run import run  # torch, the models, Accelerate: once the configuration holds
        code = run(cfg, resume, args.overwrite, messages)
    # Mistakes a user can make and fix (every loading error is a RunError): one line, never a traceback.
    except (ConfigError, RunError) as error:
        print_error(str(error), agreed=isinstance(error, AgreedRunError))
        code = EXIT_SETUP
    except KeyboardInterrupt:  # Ctrl-C / SIGTERM before the loop took the signals over: nothing to save yet
        if launched_rank() == 0:
            print("interrupted before training started; nothing was saved", file=sys.stderr)
        code = EXIT_INTERRUPTED_EARLY
    record_exit_code(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
