"""What a person sees on the terminal: one error line, progress-safe messages, library noise off.

Under a multi-process launcher every process hits the same set-up mistake at about the same
time; `print_error` has process 0 say it and the others stay quiet (see there).
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Optional
from collections.abc import Sequence

from tqdm.auto import tqdm

logger = logging.getLogger("trainer")

# How long a process other than 0 waits before printing its own error. Process 0, failing the
# same way, prints it and exits, and the launcher then ends this process during the wait (under
# trainer.launch, process 0's exit-code file ends the wait at once). Only a failure of this
# process alone is still reported, that much later. Imports alone can put processes seconds apart.
PEER_ERROR_GRACE_S = 30.0

# Set by `trainer.launch`: a folder of this node's launch where each trainer process leaves its
# process id (so that the launcher signals the trainers, not the library launcher between them)
# and, when it ends, its exit code (which no library launcher passes on).
LAUNCH_DIR_ENV = "DEPTH_DISTILL_LAUNCH_DIR"
# Written to stderr by a process that ended with a non-zero code under `trainer.launch`, after its
# own `error:` line: what the library launcher prints from then on (its traceback or failure table
# about the same exit) is dropped. It travels through the same pipes as the trainer's own output,
# so it cannot overtake it.
LAUNCHER_REPORT_FOLLOWS = "\x1e depth-distill: the trainer has said why it stopped \x1e\n"


# The trainer's exit codes (README, "Exit codes").
EXIT_OK, EXIT_SETUP, EXIT_NONFINITE, EXIT_EXPORT, EXIT_SAVE_FAILED = 0, 1, 2, 3, 4
EXIT_INTERRUPTED_EARLY = 130  # Ctrl-C or SIGTERM before training started: nothing to save


def launched_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _launch_file(kind: str, rank: int) -> Optional[Path]:
    folder = os.environ.get(LAUNCH_DIR_ENV)
    return Path(folder) / f"{kind}.{rank}" if folder else None


def _write_launch_file(kind: str, text: str) -> None:
    path = _launch_file(kind, launched_rank())
    if path is None:
        return
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    os.replace(partial, path)  # the launcher never reads a half-written file


def _process_zero_ended(timeout: float) -> bool:
    exit_file = _launch_file("exit_code", 0)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if exit_file is not None and exit_file.exists():
            return True
        time.sleep(0.1)
    return False


def print_error(message: str, agreed: bool = False) -> None:
    """The one way every tool reports a mistake: `error: message` on stderr, once per launch: by
    process 0, or by another process whose failure was its own (process 0 still running after the
    grace period). An error all processes `agreed` on is printed at once by the first process of
    each node."""
    if agreed:
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            _write_line(f"error: {message}")
        return
    if launched_rank() != 0 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if _process_zero_ended(PEER_ERROR_GRACE_S):
            return
    _write_line(f"error: {message}")


def _write_line(text: str) -> None:
    """On stderr, on a line of its own whatever a progress bar shows."""
    tqdm.write(text, file=sys.stderr)
    sys.stderr.flush()


def register_with_launcher() -> None:
    """Tell `trainer.launch` (if it started this process) which process to signal."""
    _write_launch_file("pid", f"{os.getpid()}\n")


def record_exit_code(code: int) -> int:
    """Tell `trainer.launch` how this process ended (the library launcher between them reports any
    failure as its own exit code 1, or 128 + N after a signal) -> `code`, for `sys.exit`. Every
    tool that `trainer.launch -m` runs ends through here."""
    _write_launch_file("exit_code", f"{code}\n")
    if code != 0 and os.environ.get(LAUNCH_DIR_ENV):
        print(LAUNCHER_REPORT_FOLLOWS, end="", file=sys.stderr, flush=True)
    return code


def say(message: str) -> None:
    """A line for the user, from the global main process only (the launcher's RANK), that never
    lands in the middle of a progress bar."""
    if launched_rank() == 0:
        tqdm.write(message, file=sys.stdout)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record comes (tests and tqdm swap it), not to the
    stream that was current when logging was set up."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(verbose: bool) -> None:
    """INFO from this project; libraries only warn, unless --verbose brings their chatter back
    (accelerate's 8 lines per checkpoint, the scheduler warning when the first step is skipped)."""
    root = logging.getLogger()
    if not any(isinstance(handler, _StderrHandler) for handler in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    if verbose:
        return
    for name in ("accelerate", "torch", "transformers", "timm", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # A skipped first step (non-finite loss) steps the scheduler without the optimizer on purpose.
    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


class UnreadableReporter:
    """Names each unreadable photo once per run, on the main process, with the reason.

    Datasets only mark a failed photo invalid (DataLoader workers are separate processes, made
    anew each epoch, so a warning from there would repeat per epoch and per worker); the loop hands
    the invalid indices here and the main process asks the dataset why, once per file."""

    def __init__(self, dataset, what: str):
        self.dataset, self.what = dataset, what
        self.reported: set[int] = set()

    def report(self, indices: Sequence[int]) -> None:
        for index in sorted(set(int(i) for i in indices) - self.reported):
            self.reported.add(index)
            reason = self.dataset.unreadable_reason(index) or "it failed to load once and loads now"
            logger.warning(f"skipping unreadable {self.what} photo {self.dataset.paths[index]} ({reason})")


def output_path_problem(path: Path, flag: str, what: str = "a file path") -> Optional[str]:
    """Why a command cannot write the file `path` it was given as `flag`, or None: a folder stands
    in its place, or there is no folder to put it in."""
    if path.is_dir():
        return f"{flag} {path} is a folder; give {what}"
    if not path.parent.is_dir():
        return f"folder {path.parent} for {flag} does not exist; create it or choose another {flag}"
    return None


def shown_path(path: Path) -> str:
    """A path as a user reads it: relative to the current folder when it lies under it (`runs/demo`,
    the same on every machine), else absolute."""
    absolute, here = Path(path).resolve(), Path.cwd().resolve()
    return str(absolute.relative_to(here)) if absolute.is_relative_to(here) and absolute != here else str(absolute)


def plural(count: int, noun: str, suffix: str = "s") -> str:
    return f"{count} {noun}{'' if count == 1 else suffix}"
