"""Fault injection for the reliability tests: `DEPTH_DISTILL_FAULT` makes a run fail on purpose,
at an exact step, the way real runs fail. Unset (always, outside tests) it does nothing.

    sigkill@K      the process kills itself with SIGKILL after optimizer step K (no clean-up)
    sigterm@K      SIGTERM to itself after step K (a cluster's pre-emption notice)
    nan@K[:R]      the loss of step K+1 is NaN on process R (every process if R is left out)
    nan@*[:R]      ... on every step
    diskfull@K[:R] from step K on, every save (training state, student folder) on process R fails
                   as on a full disk (OSError ENOSPC)
"""

from __future__ import annotations

import errno
import os
import signal
from dataclasses import dataclass
from typing import Optional

FAULT_ENV = "DEPTH_DISTILL_FAULT"


@dataclass(frozen=True)
class Fault:
    kind: str  # sigkill | sigterm | nan
    step: Optional[int]  # None: every step
    rank: Optional[int]  # None: every process

    @classmethod
    def from_env(cls) -> Optional["Fault"]:
        spec = os.environ.get(FAULT_ENV, "").strip()
        if not spec:
            return None
        kind, _, where = spec.partition("@")
        step, _, rank = where.partition(":")
        if kind not in ("sigkill", "sigterm", "nan", "diskfull") or not step:
            raise ValueError(f"{FAULT_ENV}={spec!r} is not one of sigkill@K, sigterm@K, nan@K[:RANK], nan@*[:RANK], "
                             f"diskfull@K[:RANK]")
        return cls(kind, None if step == "*" else int(step), int(rank) if rank else None)

    def _hits(self, step: int, rank: int) -> bool:
        return (self.step is None or self.step == step) and (self.rank is None or self.rank == rank)

    def install(self, trainer) -> None:
        """Hook the fault into a `trainer.train.loop.Trainer`: a forward hook (nan), a step-end hook
        (sigkill, sigterm) or failing save functions (diskfull). The loop itself knows nothing of it."""
        rank, progress = trainer.accelerator.process_index, trainer.progress
        if self.kind == "nan":
            def poison(module, inputs, output):  # output: (total loss, terms, student disparity)
                if self._hits(progress.step, rank):
                    return (output[0] * float("nan"), *output[1:])
                return output
            trainer.accelerator.unwrap_model(trainer.module).register_forward_hook(poison)
        elif self.kind in ("sigkill", "sigterm"):
            def kill(step: int) -> None:
                if self._hits(step, rank):
                    os.kill(os.getpid(), signal.SIGKILL if self.kind == "sigkill" else signal.SIGTERM)
            trainer.step_end_hooks.append(kill)
        else:  # diskfull: this process's saves fail from step K on, inside the trainer's own save helpers
            def failing(save):
                def save_or_fail(*args, **kwargs):
                    if (self.step is None or progress.step >= self.step) and self.rank in (None, rank):
                        raise OSError(errno.ENOSPC, "No space left on device (injected)")
                    return save(*args, **kwargs)
                return save_or_fail
            trainer.accelerator.save_state = failing(trainer.accelerator.save_state)
            trainer.student.save_pretrained = failing(trainer.student.save_pretrained)
