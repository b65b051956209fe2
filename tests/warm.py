"""Commands run in processes forked from one that has already imported the project: as a fresh
`python -m ...` runs them, less the imports. torch, transformers (which pulls in torchvision and
torchao) and timm take about 6 of the 7 seconds a tiny training run costs on 2 cores.

The fork comes from multiprocessing's fork server, not from the test process: the server has only
imported modules (no threads, no Accelerate state, no test's signal handlers), so each child
starts as clean as a new interpreter. It gets the environment, working folder and thread count
the test asks for. Its stdout and stderr are its file descriptors 1 and 2, so whatever writes
there (print, logging, tqdm, a C library) is captured, as `subprocess.run` captures it. A child
that dies by a signal reports -N, as a subprocess does.

The server starts at a pytest worker's first warm run and lives as long as the worker. What the
libraries read from the environment when they are imported (huggingface_hub's HF_HUB_OFFLINE, which
conftest.py sets) comes from the worker's environment at that moment; everything read later comes
from the environment the test passes.

Several processes are the ranks of one distributed run, each with the variables torchrun gives
its workers (`accelerate launch` runs torchrun), the gloo rendezvous on a port of their own. The
launchers themselves (`accelerate launch`, `launch.sh`, `trainer.launch`) are tested for real in
test_cli.py and test_launch.py."""

from __future__ import annotations

import importlib
import multiprocessing
import multiprocessing.connection
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from tests.launching import free_port

REPO = Path(__file__).resolve().parents[1]

# What the server imports once: everything a trainer, a tool or a benchmark imports.
PRELOAD = ["trainer.train.run", "trainer.evaluate.cli", "trainer.evaluate.evaluation", "trainer.benchmark.run",
           "trainer.prepare_shards", "trainer.train.cache_teacher", "tests.warm"]
_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(PRELOAD)
# After a rank fails, the time the others get to end on their own before they are killed (torchrun
# stops the survivors of a failed rank too; without it they would wait in a collective for ever).
GRACE_S = 30


def _child(module: str, function: str, argv: list[str], env: dict[str, str], cwd: str, stdout: str,
           stderr: str) -> None:
    for fd, path in ((1, stdout), (2, stderr)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(target, fd)
        os.close(target)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    # A fork server's child inherits its start method; a fresh interpreter has the platform's
    # default (DataLoader workers are forked on Linux, not served by a fork server of their own).
    multiprocessing.set_start_method(None, force=True)
    import torch

    # A fresh process reads OMP_NUM_THREADS when torch loads; the server loaded it long before.
    torch.set_num_threads(int(env.get("OMP_NUM_THREADS") or torch.get_num_threads()))
    try:
        code = getattr(importlib.import_module(module), function)(argv)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    sys.exit(code if isinstance(code, int) else 0)


def rank_env(env: dict[str, str], rank: int, processes: int, port: int) -> dict[str, str]:
    """What torchrun, under `accelerate launch` with a 2-process CPU config, sets for one worker."""
    if processes == 1:
        return env
    return {**env, "RANK": str(rank), "LOCAL_RANK": str(rank), "GROUP_RANK": "0", "WORLD_SIZE": str(processes),
            "LOCAL_WORLD_SIZE": str(processes), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "ACCELERATE_USE_CPU": "true", "ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_DYNAMO_BACKEND": "NO"}


def run_warm(module: str, argv: list[str], env: Optional[dict[str, str]] = None, processes: int = 1,
             function: str = "main", cwd: Path = REPO, timeout: float = 600) -> subprocess.CompletedProcess:
    """`module.function(argv)` in warm processes, one per rank (`python -m module` for the project's
    tools) -> the exit code (the first failing rank's), stdout and stderr (the ranks' together, as a
    launcher shows them), as `subprocess.run(..., capture_output=True, text=True)` gives them."""
    env = dict(os.environ if env is None else env)
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="warm_") as folder:
        stdout, stderr = Path(folder) / "stdout", Path(folder) / "stderr"
        ranks = [_CONTEXT.Process(target=_child, args=(module, function, argv, rank_env(env, rank, processes, port),
                                                       str(cwd), str(stdout), str(stderr)))
                 for rank in range(processes)]
        for process in ranks:
            process.start()
        failed = _join(ranks, timeout)
        code = failed.exitcode if failed is not None else 0
        return subprocess.CompletedProcess([module, *argv], code, stdout.read_text() if stdout.exists() else "",
                                           stderr.read_text() if stderr.exists() else "")


def _join(ranks: list, timeout: float):
    """Wait for every rank -> the first that failed, or None. Once one has failed, the others get
    GRACE_S seconds to end, then SIGKILL."""
    deadline, failed = time.monotonic() + timeout, None
    while any(process.exitcode is None for process in ranks):
        left = deadline - time.monotonic()
        if left <= 0:
            for process in ranks:
                if process.exitcode is None:
                    process.kill()
                    process.join()
            if failed is None:
                raise subprocess.TimeoutExpired(str(ranks), timeout)
            break
        multiprocessing.connection.wait([process.sentinel for process in ranks if process.exitcode is None], left)
        if failed is None:
            failed = next((process for process in ranks if process.exitcode not in (None, 0)), None)
            if failed is not None:
                deadline = min(deadline, time.monotonic() + GRACE_S)
    return failed
