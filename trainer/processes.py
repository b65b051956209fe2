"""How a trainer or evaluator process relates to its launcher and to its peers."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from typing import TYPE_CHECKING

from trainer.config import ConfigError

if TYPE_CHECKING:  # the trainer's start (trainer/main.py) imports this before it loads Accelerate
    from accelerate import Accelerator

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


# libc, opened once on import: `ask_for_sigterm_when_parent_dies` also runs between fork and exec
# (trainer.launch's child), where loading a library is not safe.
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def ask_for_sigterm_when_parent_dies() -> bool:
    """PR_SET_PDEATHSIG: Linux sends this process SIGTERM when its parent dies. -> whether the
    request was taken (not on other systems, or a libc without prctl)."""
    try:
        return _LIBC is not None and _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM) == 0
    except AttributeError:
        return False


def die_with_launcher() -> None:
    """Ask Linux to send this process SIGTERM when its parent (the launcher) dies.

    A scheduler stops a job by signalling PID 1, which is the launcher: without this, a killed
    `accelerate launch` leaves the trainer running on, unsupervised. SIGTERM is the trainer's
    'save a resumable state and stop' signal, so the run ends as cleanly as if it had been asked."""
    parent = os.getppid()
    if ask_for_sigterm_when_parent_dies() and os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)  # the launcher died before the request took effect


def check_world_size(accelerator: Accelerator) -> None:
    """`accelerate launch --multi_gpu --num_processes 2` on a machine without GPUs starts two
    processes that each believe they are alone unless ACCELERATE_USE_CPU=true: they would each
    do all the work and overwrite each other's files (or print every result twice)."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise ConfigError(f"the launcher started {launched} processes but Accelerate sees "
                          f"{accelerator.num_processes}; on a CPU-only machine set ACCELERATE_USE_CPU=true "
                          f"(or use accelerate_configs/cpu_2proc.yaml through launch.sh)")
