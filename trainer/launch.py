"""`accelerate launch trainer/main.py`, with exit codes and signals a scheduler can rely on.

    python -m trainer.launch --config_file accelerate_configs/cpu_2proc.yaml --config trainer/configs/demo.yaml
    python -m trainer.launch --num_processes 4 --config FILE --resume latest optim.lr=3e-4
    python -m trainer.launch --num_processes 2 -m trainer.evaluate --checkpoint DIR --data DIR

Takes `accelerate launch`'s own flags (--config_file, --num_processes, --machine_rank, ...) in
any position, and passes every other argument to trainer/main.py; with `-m MODULE`, to that tool
instead (trainer.evaluate, trainer.benchmark, trainer.train.cache_teacher, trainer.prepare_shards:
each records its exit code as the trainer does). `launch.sh` runs this. What it adds to
`accelerate launch`:
- the trainer's exit code (README, "Exit codes") comes out as this command's exit code, with the
  trainer's one error line and nothing of the launcher's report of the same failure (accelerate
  reports any failure as a `CalledProcessError` or `ChildFailedError` traceback and exit code 1);
- SIGTERM or SIGINT to this process (a scheduler signals PID 1; Ctrl-C signals the terminal's
  process group) reaches the trainer processes and only them: they finish the step, save a
  resumable state and exit 0, however long the save takes.

How, without accelerate's internals: `accelerate launch` (its published `accelerate-launch`
command, `python -m accelerate.commands.launch`) runs as a child process in a process group of its
own, so that neither a signal to this process's group nor Ctrl-C reaches it. Each launched
trainer process writes its process id into a folder this command made (`LAUNCH_DIR_ENV`), and
this command passes every SIGTERM/SIGINT it receives to those processes directly. The library
launcher in between never sees a signal, so whatever it does on one (accelerate 1.16 terminates
the trainer after 5 seconds and exits 128 + N; older releases died and left the trainer alone)
cannot cut a save short or change the exit code. When a trainer process ends it writes its exit
code there too, and, if it failed, a marker line on stderr after its own error line; this command
copies the launcher's stderr through, drops what follows the marker (the launcher's traceback
about that same exit), and exits with the recorded code. If this command is killed outright, Linux
sends the launcher SIGTERM (PR_SET_PDEATHSIG), which ends the run through the launcher's own path.

The one accelerate function used besides the command is `launch_command_parser`, to know which of
the arguments are the launcher's (tests/test_library_surface.py fails, naming accelerate's version,
if that changes).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

from trainer.console import LAUNCH_DIR_ENV, LAUNCHER_REPORT_FOLLOWS
from trainer.processes import ask_for_sigterm_when_parent_dies

TRAINER = str(Path(__file__).resolve().parent / "main.py")
TRAINER_FLAGS = ("--config", "--resume", "--overwrite", "--verbose", "-h", "--help")
ACCELERATE_LAUNCH = [sys.executable, "-m", "accelerate.commands.launch"]  # the `accelerate-launch` command
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


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


def recorded(folder: Path, kind: str) -> dict[int, int]:
    """{rank: number} from the files `kind`.RANK the trainer processes of this node wrote."""
    numbers = {}
    for path in folder.glob(f"{kind}.*"):
        try:
            numbers[int(path.suffix[1:])] = int(path.read_text())
        except (OSError, ValueError):
            pass
    return numbers


class SignalForwarder:
    """SIGINT / SIGTERM to this process go to the trainer processes that registered in `folder`;
    before any has (the first seconds: imports), to the launcher's process group, which ends the
    run through the launcher's own path (nothing is saved yet)."""

    def __init__(self, launcher: subprocess.Popen, folder: Path):
        self.launcher, self.folder = launcher, folder
        self.received: Optional[int] = None
        for signum in FORWARDED_SIGNALS:
            signal.signal(signum, self._forward)

    def _forward(self, signum: int, frame) -> None:
        self.received = self.received or signum
        trainers = recorded(self.folder, "pid").values()
        for pid in trainers:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:  # that one has ended already
                pass
        if not trainers:
            try:
                os.killpg(self.launcher.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass


def copy_stderr(source, drop_after_marker: bool) -> None:
    """The launcher's stderr (and the trainers', which flows through it) to ours as it comes,
    progress bars included; after a trainer's `LAUNCHER_REPORT_FOLLOWS` marker, nothing more
    (drained, so that the launcher never blocks on a full pipe)."""
    marker = LAUNCHER_REPORT_FOLLOWS.encode()
    out = sys.stderr.buffer
    pending, dropping = b"", False
    while chunk := source.read1(1 << 16):
        if dropping:
            continue
        pending += chunk
        while (at := pending.find(marker)) >= 0:  # one per process that failed
            out.write(pending[:at])
            pending, dropping = pending[at + len(marker):], drop_after_marker
            if dropping:
                break
        if not dropping:
            # Hold back only a tail that could be the start of a marker split across two reads.
            keep = next((n for n in range(min(len(marker) - 1, len(pending)), 0, -1)
                         if marker.startswith(pending[-n:])), 0)
            out.write(pending[:len(pending) - keep])
            pending = pending[len(pending) - keep:]
        out.flush()
    if not dropping:
        out.write(pending)
        out.flush()


def exit_code(launcher_code: int, codes: dict[int, int], interrupted_by: Optional[int]) -> int:
    """The run's exit code: 0 if the launcher saw every process succeed; otherwise the code of the
    lowest process rank on this node that recorded a failure (process 0 speaks for the run);
    128 + N if this command was signalled before any trainer recorded anything; else the
    launcher's own code (a child killed by signal N reports -N: shells expect 128 + N)."""
    if launcher_code == 0:
        return 0
    failures = [code for _, code in sorted(codes.items()) if code != 0]
    if failures:
        return failures[0]
    if interrupted_by is not None and not codes:
        return 128 + interrupted_by
    return 128 - launcher_code if launcher_code < 0 else launcher_code


def _own_group_dying_with_us() -> None:  # runs in the launcher's child process, before exec
    os.setpgrp()
    ask_for_sigterm_when_parent_dies()


def launch(argv: list[str]) -> int:
    launcher_args, trainer_args = split_arguments(argv)
    # `-m MODULE` (accelerate's own flag) runs that tool; its name is the first argument it leaves.
    script = [] if {"-m", "--module"} & set(launcher_args) else [TRAINER]
    verbose = "--verbose" in trainer_args
    env = dict(os.environ)
    if not verbose:  # torch's launcher logs every child's failure and every signal it sends
        env.setdefault("LOGLEVEL", "CRITICAL")
    with tempfile.TemporaryDirectory(prefix="depth_distill_launch_") as folder:
        env[LAUNCH_DIR_ENV] = folder
        launcher = subprocess.Popen([*ACCELERATE_LAUNCH, *launcher_args, *script, *trainer_args], env=env,
                                    stderr=subprocess.PIPE, preexec_fn=_own_group_dying_with_us)
        forwarder = SignalForwarder(launcher, Path(folder))
        with launcher.stderr:
            copy_stderr(launcher.stderr, drop_after_marker=not verbose)
        launcher.wait()
        return exit_code(launcher.returncode, recorded(Path(folder), "exit_code"), forwarder.received)


def main(argv: Optional[list[str]] = None) -> int:
    try:
        return launch(sys.argv[1:] if argv is None else argv)
    except KeyboardInterrupt:  # Ctrl-C while importing accelerate, before the trainer was started
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main())
