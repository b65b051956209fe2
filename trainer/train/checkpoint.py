"""Both kinds of checkpoint, written so that a crash mid-write never costs a good one.

- Training state (`checkpoints/step_XXXXXXXX/`): everything `accelerator.save_state` knows
  (model + adapters, optimizer, scheduler, grad scaler, every process's RNG, registered
  counters), written to a hidden temporary folder and renamed into place only once complete.
- Deploy artifact (`student_best/`, `student_last/`): the unwrapped student alone, as a
  `from_pretrained`-loadable folder (config.json + model.safetensors), never the adapters.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator
from torch import nn

from core.errors import RunError, first_line

logger = logging.getLogger(__name__)

STATES_DIR = "checkpoints"
STATE_PREFIX = "step_"
COMPLETE_MARKER = "COMPLETE"  # written last, inside the temporary folder, before the rename


class CheckpointError(RunError):
    """No usable training state where one was asked for."""


def all_finite(module: nn.Module) -> bool:
    """Parameters and buffers: a skipped step can still leave NaN in BatchNorm running stats."""
    return all(torch.isfinite(t).all() for t in module.state_dict().values() if t.is_floating_point())


def all_processes_agree(accelerator: Accelerator, ok: bool) -> bool:
    """Collective: True only if `ok` holds on every process, so all of them take the same branch."""
    flag = torch.tensor(float(ok), device=accelerator.device)
    return accelerator.reduce(flag, "sum").item() == accelerator.num_processes


def _saved_step(state: Path) -> Optional[int]:
    """The step written into a state's COMPLETE marker (None: not a finished state)."""
    try:
        return int((state / COMPLETE_MARKER).read_text().strip())
    except (OSError, ValueError):
        return None


def complete_states(run_dir: Path) -> list[Path]:
    """Finished training states of a run, oldest first, by the step their marker records (not by
    folder name or time: a renamed or copied folder keeps its place)."""
    root = Path(run_dir) / STATES_DIR
    if not root.is_dir():
        return []
    steps = {p: _saved_step(p) for p in root.iterdir() if p.is_dir() and p.name.startswith(STATE_PREFIX)}
    return sorted((p for p, step in steps.items() if step is not None), key=lambda p: (steps[p], p.name))


def resume_candidates(run_dir: Path, resume: str) -> list[Path]:
    """`latest` -> every complete state newest first (the caller falls back to older ones if the
    newest turns out unreadable); otherwise the one folder given."""
    if resume == "latest":
        states = complete_states(run_dir)[::-1]
        if not states:
            raise CheckpointError(f"--resume latest: no complete training state under {Path(run_dir) / STATES_DIR}")
        return states
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"--resume {resume}: no such training-state folder")
    if not (path / COMPLETE_MARKER).is_file():
        raise CheckpointError(f"--resume {resume}: the folder is not a complete training state "
                              f"(no {COMPLETE_MARKER} marker: the save was interrupted)")
    return [path]


def load_training_state(accelerator: Accelerator, candidates: list[Path]) -> Path:
    """Collective: load the first candidate that reads back on every process; say which ones
    were skipped and why. Agreeing matters: each process reads its own RNG file, and processes
    resumed from different states would drift apart or hang in a collective."""
    for path in candidates:
        try:
            accelerator.load_state(str(path))
            ok = True
        except Exception as error:  # a truncated or corrupted file: try the previous state
            logger.warning("training state %s is unreadable (%s); trying an older one", path, first_line(error))
            ok = False
        if all_processes_agree(accelerator, ok):
            return path
    raise CheckpointError(f"none of the training states could be loaded: {', '.join(map(str, candidates))}")


def save_training_state(accelerator: Accelerator, run_dir: Path, step: int, keep_last: int) -> Optional[Path]:
    """Collective: every process calls it. Returns the new folder, or None if the save failed
    on any process (the failure is logged and the previous states are untouched)."""
    root = Path(run_dir) / STATES_DIR
    final = root / f"{STATE_PREFIX}{step:08d}"
    tmp = root / f".tmp_{final.name}"
    ok = True
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
    except OSError as error:
        logger.error("could not create %s (%s)", tmp, first_line(error))
        ok = False
    if all_processes_agree(accelerator, ok):
        try:
            accelerator.save_state(str(tmp))
        except Exception as error:  # disk full: OSError, or RuntimeError/SafetensorError from the writers
            logger.error("could not save the training state at step %d (%s); the previous states are kept",
                         step, first_line(error))
            ok = False
    if not all_processes_agree(accelerator, ok):  # a state missing one process's files is no state
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        return None
    if not accelerator.is_main_process:
        return final
    try:
        (tmp / COMPLETE_MARKER).write_text(f"{step}\n")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    except OSError as error:
        logger.error("could not finish the training state at step %d (%s)", step, first_line(error))
        shutil.rmtree(tmp, ignore_errors=True)
        return None
    for old in complete_states(run_dir)[:-keep_last]:  # the newest good one is never among these
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_student(student: nn.Module, path: Path) -> bool:
    """Main process only. Atomic like the training state; refuses non-finite weights."""
    path = Path(path)
    if not all_finite(student):
        logger.error("not writing %s: the student has non-finite weights or buffers", path)
        return False
    tmp = path.with_name(f".tmp_{path.name}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        student.save_pretrained(tmp)
        old = path.with_name(f".old_{path.name}")
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    except Exception as error:  # disk full surfaces as OSError or as the writer's own error type
        logger.error("could not write %s (%s); the previous copy is kept", path, first_line(error))
        shutil.rmtree(tmp, ignore_errors=True)
        return False
    return True
