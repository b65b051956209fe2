"""`accelerate launch trainer/main.py`, with exit codes and signals a scheduler can rely on.

    python -m trainer.launch --config_file accelerate_configs/cpu_2proc.yaml --config trainer/configs/demo.yaml
    python -m trainer.launch --num_processes 4 --config FILE --resume latest optim.lr=3e-4

Takes `accelerate launch`'s own flags (--config_file, --num_processes, --machine_rank, ...) in
any position, and passes every other argument to trainer/main.py. `launch.sh` runs this. What it
adds to `accelerate launch`:
- the trainer's exit code (0, 1, 2, 3: see README) comes out as this command's exit code, with
  the trainer's one error line and no launcher traceback (accelerate reports any failure as a
  `CalledProcessError` or `ChildFailedError` traceback and exit code 1);
- SIGTERM or SIGINT to this process (a scheduler signals PID 1) reaches the trainer, which saves a
  resumable state; the exit code is then the trainer's own (0 once the state is saved).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

from trainer.console import STATUS_FILE_ENV

TRAINER = str(Path(__file__).resolve().parent / "main.py")
TRAINER_FLAGS = ("--config", "--resume", "--overwrite", "--verbose", "-h", "--help")


def split_arguments(argv: list[str]) -> tuple[list[str], list[str]]:
    """-> (accelerate launch's flags, trainer/main.py's arguments), each in the order given."""
    from accelerate.commands.launch import launch_command_parser

    takes_value = {option: action.nargs != 0 for action in launch_command_parser()._actions
                   for option in action.option_strings if option not in TRAINER_FLAGS}
    launcher, trainer = [], []
    i = 0
    while i < len(argv):
        name, has_value, _ = argv[i].partition("=")
        if name in takes_value:
            launcher.append(argv[i])
            if takes_value[name] and not has_value and i + 1 < len(argv):
                launcher.append(argv[i + 1])
                i += 1
        else:
            trainer.append(argv[i])
        i += 1
    return launcher, trainer


def _children() -> list[int]:
    """Process ids of this process's children (Linux /proc; elsewhere none are found)."""
    pids = []
    for task in Path(f"/proc/{os.getpid()}/task").glob("*"):
        try:
            pids += [int(pid) for pid in (task / "children").read_text().split()]
        except OSError:
            pass
    return pids


def _forward_to_children(signum: int, frame) -> None:
    # The single-process launcher only waits on its child: pass the signal on (the trainer
    # saves a state and exits) and keep waiting, instead of dying and orphaning the trainer.
    for pid in _children():
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def _exit_code_after_signal(status_file: Path, signum: int) -> int:
    # torch's multi-process launcher passes a signal on to the trainers, waits for them, then
    # raises; process 0 wrote how the run ended (0: a resumable state was saved).
    try:
        return int(status_file.read_text().strip())
    except (OSError, ValueError):
        return 128 + signum


def launch(argv: list[str]) -> int:
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    launcher_args, trainer_args = split_arguments(argv)
    args = launch_command_parser().parse_args([*launcher_args, TRAINER, *trainer_args])
    if "--verbose" not in trainer_args:
        # torch's launcher logs every child's failure and every signal it sends; the trainer's
        # own line says what went wrong.
        os.environ.setdefault("LOGLEVEL", "CRITICAL")
        logging.getLogger("torch.distributed").setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="depth_distill_launch_") as folder:
        status_file = Path(folder) / "exit_code"
        os.environ[STATUS_FILE_ENV] = str(status_file)
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, _forward_to_children)
        try:
            launch_command(args)
        except subprocess.CalledProcessError as error:  # one process
            return _signal_exit(error.returncode)
        except ChildFailedError as error:  # several: the first process that failed says why
            _, failure = error.get_first_failure()
            return _signal_exit(failure.exitcode)
        except SignalException as error:
            return _exit_code_after_signal(status_file, error.sigval)
    return 0


def _signal_exit(returncode: int) -> int:
    """A child killed by signal N reports -N; shells and schedulers expect 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def main(argv: Optional[list[str]] = None) -> int:
    return launch(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
