"""tests/install_browser.sh, the one set-up step the README and .ci/run share, on the machines a user
has: root without sudo (containers, CI images), a user with sudo, no apt-get, no npm. The system's
commands are stand-ins on PATH that record how they were called."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "install_browser.sh"


def _stand_ins(tmp_path: Path, uid: int, commands: tuple[str, ...]) -> tuple[Path, Path]:
    """A PATH holding `id` (answers `uid`), a recording stand-in for each of `commands` (sudo runs
    the rest of its line) and the few real tools the script needs -> (PATH folder, call log)."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir(parents=True)
    for tool in ("dirname",):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    scripts = {"id": f'echo {uid}\n'}
    for name in commands:
        run_rest = '"$@"\n' if name == "sudo" else ""
        scripts[name] = f'echo "{name} $*" >> {log}\n{run_rest}'
    for name, body in scripts.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + body)
        (bin_dir / name).chmod(0o755)
    return bin_dir, log


def _install(tmp_path: Path, uid: int, commands: tuple[str, ...], required: bool = False):
    bin_dir, log = _stand_ins(tmp_path, uid, commands)
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path)}
    if required:
        env["DEPTH_DISTILL_REQUIRE_ALL_TESTS"] = "1"
    done = subprocess.run([shutil.which("bash"), str(SCRIPT)], env=env, capture_output=True, text=True, timeout=30)
    calls = log.read_text().splitlines() if log.exists() else []
    return done, calls


NPM = "npm ci --prefix web --no-audit --no-fund"


def test_as_root_without_sudo_installs_directly(tmp_path):
    done, calls = _install(tmp_path, 0, ("apt-get", "npm"))
    assert done.returncode == 0, done.stderr
    assert calls == ["apt-get update -q", "apt-get install -y -q --no-install-recommends chromium", NPM]


def test_as_a_user_with_sudo_installs_through_sudo(tmp_path):
    done, calls = _install(tmp_path, 1000, ("apt-get", "sudo", "npm"))
    assert done.returncode == 0, done.stderr
    assert calls == ["sudo apt-get update -q", "apt-get update -q",
                     "sudo apt-get install -y -q --no-install-recommends chromium",
                     "apt-get install -y -q --no-install-recommends chromium", NPM]


def test_an_installed_chromium_is_left_alone(tmp_path):
    done, calls = _install(tmp_path, 1000, ("chromium", "apt-get", "npm"))
    assert done.returncode == 0, done.stderr
    assert calls == [NPM]


@pytest.mark.parametrize("commands, expected", [
    (("npm",), "no apt-get here"),
    (("apt-get", "npm"), "there is no sudo"),
    (("apt-get", "sudo"), "no npm here"),
])
def test_what_cannot_be_installed_is_named_and_skipped_unless_required(tmp_path, commands, expected):
    done, calls = _install(tmp_path / "optional", 1000, commands)
    assert done.returncode == 0 and expected in done.stderr and "tests will be skipped" in done.stderr
    required, _ = _install(tmp_path / "required", 1000, commands, required=True)
    assert required.returncode == 1 and expected in required.stderr and "required" in required.stderr


def test_a_failing_install_fails_the_script(tmp_path):
    bin_dir, _ = _stand_ins(tmp_path, 0, ("npm",))
    (bin_dir / "apt-get").write_text("#!/bin/bash\nexit 100\n")
    (bin_dir / "apt-get").chmod(0o755)
    done = subprocess.run([shutil.which("bash"), str(SCRIPT)], env={"PATH": str(bin_dir)}, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 100


def test_the_readme_and_ci_both_run_it():
    readme, ci = (REPO / "README.md").read_text(), (REPO / ".ci" / "run").read_text()
    assert "bash tests/install_browser.sh" in readme and "bash tests/install_browser.sh" in ci
    assert "apt-get" not in ci and "npm ci" not in ci
