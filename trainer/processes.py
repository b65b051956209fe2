"""How a trainer or evaluator process relates to its launcher and to its peers."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

from accelerate import Accelerator

from trainer.config import ConfigError

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_launcher() -> None:
    """Ask Linux to send this process SIGTERM when its parent (the launcher) dies.

    A scheduler stops a job by signalling PID 1, which is the launcher: without this, a killed
    `accelerate launch` leaves the trainer running on, unsupervised. SIGTERM is the trainer's
    'save a resumable state and stop' signal, so the run ends as cleanly as if it had been asked."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # no prctl in this libc: keep the default behaviour
        return
    if os.getppid() != parent:  # the launcher died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def check_world_size(accelerator: Accelerator) -> None:
    """`accelerate launch --multi_gpu --num_processes 2` on a machine without GPUs starts two
    processes that each believe they are alone unless ACCELERATE_USE_CPU=true: they would each
    do all the work and overwrite each other's files (or print every result twice)."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise ConfigError(f"the launcher started {launched} processes but Accelerate sees "
                          f"{accelerator.num_processes}; on a CPU-only machine set ACCELERATE_USE_CPU=true "
                          f"(or use accelerate_configs/cpu_2proc.yaml through launch.sh)")
