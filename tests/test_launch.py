"""trainer.launch's parts with known answers (the stderr filter, the exit-code rule), and a signal
to the trainer under plain `accelerate launch`. The signals through launch.sh are in test_cli.py."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.test_cli import LAUNCH_ENV, _start, _wait_for_training
from tests.test_trainer import REPO, tiny_run_args
from trainer.console import LAUNCH_DIR_ENV, LAUNCHER_REPORT_FOLLOWS
from trainer.launch import copy_stderr, exit_code

MARKER = LAUNCHER_REPORT_FOLLOWS.encode()


class Chunks:
    """A pipe that hands over the given chunks, one per read."""

    def __init__(self, chunks: list[bytes]):
        self.chunks = list(chunks)

    def read1(self, size: int) -> bytes:
        return self.chunks.pop(0) if self.chunks else b""


def copied(chunks: list[bytes], drop_after_marker: bool, monkeypatch) -> bytes:
    out = io.TextIOWrapper(io.BytesIO(), write_through=True)
    monkeypatch.setattr(sys, "stderr", out)
    copy_stderr(Chunks(chunks), drop_after_marker)
    return out.buffer.getvalue()


@pytest.mark.parametrize("cut", [0, 1, 5, len(MARKER) - 1, len(MARKER)])
def test_what_follows_the_marker_is_dropped_wherever_the_reads_cut_it(cut, monkeypatch):
    trainer = b"distill: 3/9 [00:01<00:02]\rdistill: 4/9\nerror: train.epochs must be >= 1\n"
    launcher = b"Traceback (most recent call last):\n  ...\nsubprocess.CalledProcessError: ... exit status 1.\n"
    stream = trainer + MARKER + launcher
    at = len(trainer) + cut
    assert copied([stream[:at], stream[at:]], True, monkeypatch) == trainer
    # --verbose: the launcher's report stays, the marker goes.
    assert copied([stream[:at], stream[at:]], False, monkeypatch) == trainer + launcher


def test_output_without_a_marker_passes_unchanged_even_byte_by_byte(monkeypatch):
    # Ends with the marker's first bytes: held back while they could start one, then let through.
    stream = b"step 1\rstep 2\r" + b"Traceback (most recent call last):\n" + MARKER[:4]
    assert copied([stream[i:i + 1] for i in range(len(stream))], True, monkeypatch) == stream


@pytest.mark.parametrize("launcher, recorded, signalled, expected", [
    (0, {0: 0, 1: 0}, None, 0),              # done
    (0, {0: 0}, signal.SIGTERM, 0),          # interrupted, state saved
    (1, {0: 2, 1: 2}, None, 2),              # the trainer's own code, not the launcher's 1
    (1, {1: 4}, None, 4),                    # process 0 was ended by the launcher: process 1 says why
    (1, {0: 3, 1: 1}, None, 3),              # process 0 speaks for the run
    (143, {}, signal.SIGTERM, 143),          # signalled before any trainer could record anything
    (1, {0: 130}, signal.SIGINT, 130),       # Ctrl-C during set-up
    (-9, {}, None, 137),                     # the launcher was killed
    (1, {}, None, 1),                        # a trainer crashed (its traceback was shown)
])
def test_the_run_exit_code(launcher, recorded, signalled, expected):
    assert exit_code(launcher, recorded, signalled) == expected


def test_sigterm_to_the_trainer_under_plain_accelerate_launch_saves_and_exits_0(tmp_path, photo_dir):
    """What a scheduler that signals the job's processes does, under accelerate's own launcher (a
    signal to that launcher is accelerate's to handle: README, `launch.sh`)."""
    run_dir, launch_dir = tmp_path / "run", tmp_path / "launch"
    launch_dir.mkdir()
    env = {**os.environ, **LAUNCH_ENV, "ACCELERATE_USE_CPU": "true", LAUNCH_DIR_ENV: str(launch_dir)}
    env.pop("DEPTH_DISTILL_FAULT", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate_configs/cpu.yaml",
         "trainer/main.py", *tiny_run_args(run_dir, photo_dir, "train.max_steps=100000", "train.save_every=100000",
                                           "data.val_fraction=0")],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    _wait_for_training(run_dir, process)
    trainer_pid = int((launch_dir / "pid.0").read_text())
    os.kill(trainer_pid, signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-3000:]
    assert "interrupted: resumable state saved at step" in stdout
    assert len(list((run_dir / "checkpoints").glob("step_*"))) == 1
    assert (launch_dir / "exit_code.0").read_text().strip() == "0"


def test_a_killed_launcher_leaves_nothing_of_the_run_running(tmp_path, photo_dir):
    """SIGKILL to trainer.launch (no chance to pass anything on), whose child, accelerate's launcher,
    sits in a process group of its own: the run still ends. (Two things end it: the launcher loses
    the reader of its stderr at its next write, and Linux sends it SIGTERM, PR_SET_PDEATHSIG; either
    alone suffices, so the test cannot tell them apart.)"""
    run_dir = tmp_path / "run"
    process = _start(tiny_run_args(run_dir, photo_dir, "train.max_steps=100000", "train.save_every=100000",
                                   "data.val_fraction=0"), "cpu")
    _wait_for_training(run_dir, process)
    process.kill()
    process.communicate(timeout=30)
    deadline = time.monotonic() + 60
    while subprocess.run(["pgrep", "-f", str(run_dir)], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "the run kept going after its launcher was killed"
        time.sleep(0.5)


def test_with_verbose_every_processs_marker_is_removed_and_nothing_dropped(monkeypatch):
    first, second, report = b"error: one\n", b"error: two\n", b"Traceback ...\n"
    stream = first + MARKER + second + MARKER + report
    assert copied([stream], False, monkeypatch) == first + second + report
    assert copied([stream], True, monkeypatch) == first
