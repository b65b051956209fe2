"""tests/warm.py: a warm process starts as a fresh `python -m ...` would, so that the trainer tests
run on it prove what they would prove in a new interpreter."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys

from tests.warm import run_warm


def report(argv: list[str]) -> int:
    """What a child sees, on stdout (Python's and the C library's) and stderr; exits argv[0]."""
    import torch

    print(json.dumps({"start_method": multiprocessing.get_start_method(), "threads": torch.get_num_threads(),
                      "cwd": os.getcwd(), "marker": os.environ.get("WARM_TEST_MARKER"),
                      "rank": os.environ.get("RANK"), "world_size": os.environ.get("WORLD_SIZE")}), flush=True)
    os.write(1, b"written to fd 1\n")
    print("to stderr", file=sys.stderr)
    if argv[0] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    return int(argv[0])


def test_a_warm_process_starts_as_a_fresh_one(tmp_path):
    done = run_warm("tests.test_warm", ["3"], {**os.environ, "WARM_TEST_MARKER": "x", "OMP_NUM_THREADS": "1"},
                    function="report", cwd=tmp_path)
    assert done.returncode == 3
    seen = json.loads(done.stdout.splitlines()[0])
    fresh = subprocess.run([sys.executable, "-c", "import json, multiprocessing, torch; print(json.dumps("
                            "[multiprocessing.get_start_method(), torch.get_num_threads()]))"],
                           env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True).stdout
    # The fork server's own start method would make DataLoader workers start a fork server of their own.
    assert [seen["start_method"], seen["threads"]] == json.loads(fresh)
    assert seen["cwd"] == str(tmp_path) and seen["marker"] == "x" and seen["rank"] is None
    assert done.stdout.splitlines()[1] == "written to fd 1" and done.stderr == "to stderr\n"


def test_a_killed_warm_process_reports_the_signal_and_ranks_get_torchruns_variables():
    assert run_warm("tests.test_warm", ["kill"], function="report").returncode == -signal.SIGKILL
    done = run_warm("tests.test_warm", ["0"], function="report", processes=2)
    assert done.returncode == 0
    seen = sorted((json.loads(line)["rank"], json.loads(line)["world_size"]) for line in done.stdout.splitlines()
                  if line.startswith("{"))
    assert seen == [("0", "2"), ("1", "2")]


def test_the_first_failing_rank_stops_the_others():
    """A rank that fails leaves the others waiting in a collective (here: for ever): they are
    stopped after the grace period, as torchrun stops the survivors of a failed worker."""
    import tests.warm as warm

    ranks = [warm._CONTEXT.Process(target=_wait_for_ever), warm._CONTEXT.Process(target=_fail)]
    for process in ranks:
        process.start()
    old, warm.GRACE_S = warm.GRACE_S, 1
    try:
        failed = warm._join(ranks, timeout=60)
    finally:
        warm.GRACE_S = old
    assert failed is ranks[1] and failed.exitcode == 5 and ranks[0].exitcode == -signal.SIGKILL


def _wait_for_ever() -> None:
    signal.pause()


def _fail() -> None:
    sys.exit(5)
