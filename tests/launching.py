"""How tests start `accelerate launch`: the command for one of accelerate_configs/, with a port of
its own. Tests run on several pytest-xdist workers at once, and two 2-process launches on
accelerate's default port (29500) would take each other's rendezvous."""

from __future__ import annotations

import os
import socket
import sys


def free_port() -> int:
    """A TCP port nothing listens on now (the kernel's pick for port 0)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def port_flag() -> list[str]:
    """The launcher flag that gives one launch a port of its own (launch.sh passes it through)."""
    return ["--main_process_port", str(free_port())]


def launch_env() -> dict[str, str]:
    """The environment of a launch on the CPU: offline, one thread per process, and
    ACCELERATE_USE_CPU, without which a 2-process CPU config starts two separate runs."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}


def accelerate_launch(config: str) -> list[str]:
    """`accelerate launch --config_file accelerate_configs/<config>.yaml` with a port of its own;
    append the script (or -m MODULE) and its arguments. Run it from the repository root."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", f"accelerate_configs/{config}.yaml",
            *port_flag()]
