"""The run folder (`output_dir`): which folder holds a run, and what of it the trainer may delete.

A folder is a run only if it holds the marker file the trainer writes when it starts one. Only
then does `--overwrite` delete anything, and only the names the trainer itself writes (listed in
RUN_OUTPUTS): a user's files beside them, or a folder that never held a run (the source tree, a
home folder), are never touched.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Optional

from accelerate.utils import broadcast_object_list

from core.errors import AgreedRunError, RunError, first_line
from trainer.config import Config, ConfigError
from trainer.console import say
from trainer.train.checkpoint import STATES_DIR, CheckpointError, all_processes_agree

RUN_MARKER = "depth_distill_run.json"
CONFIG_FILE = "config.yaml"
TENSORBOARD_DIR = "tensorboard"
ONNX_FILE = "student.onnx"
# Everything a run writes directly under its folder; `--overwrite` deletes these and nothing else.
STUDENT_DIRS = ("student_best", "student_last")
RUN_OUTPUTS = (CONFIG_FILE, f".tmp_{CONFIG_FILE}", TENSORBOARD_DIR, STATES_DIR, ONNX_FILE, f"{ONNX_FILE}.json",
               f".tmp_{ONNX_FILE}", *STUDENT_DIRS,
               *(f"{prefix}{name}" for prefix in (".tmp_", ".old_") for name in STUDENT_DIRS))


def holds_run(run_dir: Path) -> bool:
    return (Path(run_dir) / RUN_MARKER).is_file()


def locate_resumed_run(resume: str, given: Optional[Config]) -> tuple[Path, str]:
    """-> (run folder, what to load: 'latest' or a state folder) for `--resume`."""
    if resume == "latest":
        if given is None:
            raise ConfigError("--resume latest needs --config (to find the run), or pass the run folder: "
                              "--resume runs/<run_name>")
        return given.run_dir, "latest"
    path = Path(resume)
    if holds_run(path):
        return path, "latest"
    if path.parent.name == STATES_DIR and holds_run(path.parent.parent):
        return path.parent.parent, resume
    raise CheckpointError(f"--resume {resume}: neither 'latest', a run folder (holding {RUN_MARKER}) nor a "
                          f"training-state folder of one (runs/<run_name>/{STATES_DIR}/step_XXXXXXXX)")


def check_run_dir(run_dir: Path, resume: Optional[str], overwrite: bool) -> None:
    """Refuse to mix two runs in one folder, to write over files the trainer did not write, and
    a folder it cannot write to. Runs on every process before any model is built."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunError(f"output_dir {run_dir} is a file, not a folder; choose another output_dir")
    if resume:
        if not holds_run(run_dir):
            raise RunError(f"--resume {resume}: {run_dir} holds no run to resume (no {RUN_MARKER}); "
                           f"check run_name/output_dir")
        return
    if holds_run(run_dir):
        if not overwrite:
            raise RunError(f"output_dir {run_dir} already holds a run; pass --resume latest to continue it "
                           f"or --overwrite to start over (or choose another run_name)")
    else:
        foreign = [name for name in RUN_OUTPUTS if (run_dir / name).exists()]
        if foreign:
            raise RunError(f"output_dir {run_dir} holds {', '.join(foreign)} but no run of this trainer "
                           f"(no {RUN_MARKER}); nothing was deleted: choose another output_dir")
    check_writable(run_dir)


def check_writable(folder: Path) -> None:
    """Create `folder` if needed and write a probe file in it: permissions, a read-only mount or
    a full disk show up here, before any model is built, not at the first save."""
    probe = Path(folder) / f".write_test_{os.getpid()}"
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as error:
        raise RunError(f"output_dir {folder} is not writable ({first_line(error)}); "
                       f"choose a folder you can write to") from None


def start_run(run_dir: Path, config_yaml: str, overwrite: bool) -> list[str]:
    """Main process only, after `check_run_dir`: clear a previous run's outputs if asked, then
    write the marker and the configuration. Returns the names deleted."""
    run_dir = Path(run_dir)
    deleted = []
    if overwrite and holds_run(run_dir):
        for name in RUN_OUTPUTS:
            path = run_dir / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
                deleted.append(name)
            elif path.exists() or path.is_symlink():
                path.unlink()
                deleted.append(name)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RUN_MARKER).write_text(json.dumps({"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                                  "outputs": list(RUN_OUTPUTS)}, indent=1) + "\n")
    write_config(run_dir, config_yaml)
    return deleted


def prepare_run_dir(accelerator, run_dir: Path, config_yaml: str, resume: Optional[str], overwrite: bool) -> None:
    """Collective, after `check_run_dir`: the main process starts the run (or rewrites a resumed
    run's configuration with the changes a resume may make), then every process checks it sees
    the folder."""
    if accelerator.is_main_process:
        if resume:
            write_config(run_dir, config_yaml)
        else:
            deleted = start_run(run_dir, config_yaml, overwrite)
            if deleted:
                say(f"--overwrite: deleted the previous run's {', '.join(deleted)} in {run_dir}")
    check_shared(accelerator, run_dir)


def check_shared(accelerator, run_dir: Path) -> None:
    """Collective. Every process must see what process 0 writes in the run folder: on several
    nodes without a shared filesystem each node would keep its own half-written checkpoints, and a
    resume would find the run on one node only and hang the others."""
    token = [secrets.token_hex(8) if accelerator.is_main_process else None]
    broadcast_object_list(token)
    probe = Path(run_dir) / f".shared_check_{token[0]}"
    if accelerator.is_main_process:
        probe.write_text(token[0])
    accelerator.wait_for_everyone()
    seen = probe.is_file() and probe.read_text() == token[0]
    all_see = all_processes_agree(accelerator, seen)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        probe.unlink()
    if not all_see:
        raise AgreedRunError(f"output_dir {run_dir} is not shared by all processes: some do not see the files "
                             f"process 0 writes there (another node's disk?); a multi-node run needs output_dir "
                             f"on a filesystem every node mounts (NFS, Lustre, a cloud file share)")


def write_config(run_dir: Path, config_yaml: str) -> None:
    path = Path(run_dir) / CONFIG_FILE
    tmp = path.with_name(f".tmp_{CONFIG_FILE}")
    tmp.write_text(config_yaml)
    os.replace(tmp, path)
