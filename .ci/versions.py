"""The versions this project is tested with, and the test against the newest releases.

    python3 .ci/versions.py newest [PYTEST ARGS]   # fresh venv, newest releases, the suite; drift listed
    python3 .ci/versions.py refresh                # the same; if it passes, the newest become the tested
    python3 .ci/versions.py oldest [PYTEST ARGS]   # the tested set with accelerate at setup.cfg's lower bound
    python3 .ci/versions.py record VENV            # VENV's packages become the tested set (the suite passed there)

`tested-versions.txt` (pip's constraints format) holds every package of the environment the whole
suite last passed in. `.ci/run` installs through it, so that a new release of a dependency cannot
turn CI red overnight; setup.cfg's upper bounds are those same versions, so that a user's `pip install`
only ever picks releases that passed. `newest` installs setup.cfg's requirements with their upper
bounds lifted (the newest releases this machine's package index serves) into `.venv-newest`, prints
what differs from the tested set and runs the suite: drift is found on purpose, not by users.
`refresh` runs `newest` and, only if the suite passes, writes `tested-versions.txt` from that
environment, moves setup.cfg's upper bounds to it and rewrites README's table of tested versions;
`record` does the same for an environment whose suite run passed elsewhere (CI's, say). `oldest`
checks the lower bound that the launcher's signal handling depends on (`trainer/launch.py`): the
tested set with the oldest accelerate setup.cfg allows, in `.venv-oldest`, running the launcher
and exit-code tests unless given other pytest arguments.

Standard library only: it runs under any python3 before the project is installed.
"""

from __future__ import annotations

import configparser
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETUP_CFG = REPO / "setup.cfg"
TESTED = REPO / "tested-versions.txt"
README = REPO / "README.md"
TABLE_START, TABLE_END = "<!-- tested-versions: written by .ci/versions.py -->", "<!-- /tested-versions -->"
EXTRAS = ("mobile", "dev")  # every extra: the suite exercises them all
OLDEST_CHECKED = ("accelerate",)  # packages whose lower bound `oldest` installs
OLDEST_TESTS = ["tests/test_launch.py", "tests/test_cli.py", "tests/test_library_surface.py", "-k",
                "launch or signal or exit_code or config_error or accelerate"]
HEADER = ("# The versions the whole test suite last passed with, as pip constraints:\n"
          "#   pip install -c tested-versions.txt -e '.[dev]'\n"
          "# Written by `python3 .ci/versions.py refresh`; setup.cfg's upper bounds are these versions.\n")
REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?\s*([^;#]*?)\s*(;[^#]*)?(#.*)?$")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_lines() -> list[str]:
    """setup.cfg's install_requires and extras, as written (comments dropped)."""
    cfg = configparser.ConfigParser()
    cfg.read(SETUP_CFG)
    texts = [cfg["options"]["install_requires"]] + [cfg["options.extras_require"][extra] for extra in EXTRAS]
    return [line.strip() for text in texts for line in text.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def specifiers(line: str) -> tuple[str, list[str]]:
    match = REQUIREMENT.match(line)
    if not match:
        raise SystemExit(f"error: cannot read the requirement {line!r} in {SETUP_CFG}")
    return match.group(1), [s.strip() for s in match.group(3).split(",") if s.strip()]


def without_upper_bounds(line: str) -> str:
    name, specs = specifiers(line)
    return name + ",".join(s for s in specs if not s.startswith(("<", "==", "~=")))


def lower_bound(line: str) -> str:
    name, specs = specifiers(line)
    floors = [s[2:] for s in specs if s.startswith(">=")]
    if not floors:
        raise SystemExit(f"error: {line!r} in {SETUP_CFG} has no lower bound (>=) to test")
    return f"{name}=={floors[0]}"


def read_pins(text: str) -> dict[str, str]:
    pins = {}
    for line in text.splitlines():
        name, sep, version = line.strip().partition("==")
        if sep and not line.startswith("#"):
            pins[canonical(name)] = version.strip()
    return pins


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    print("+", " ".join(command), flush=True)
    return subprocess.run(command, check=True, **kwargs)


def fresh_venv(folder: Path) -> Path:
    run([sys.executable, "-m", "venv", "--clear", str(folder)])
    python = folder / "bin" / "python"
    run([str(python), "-m", "pip", "install", "-q", "--upgrade", "pip"])
    return python


def install_newest(python: Path) -> dict[str, str]:
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as requirements:
        requirements.write("\n".join(without_upper_bounds(line) for line in requirement_lines()) + "\n")
    run([str(python), "-m", "pip", "install", "-q", "-r", requirements.name])
    run([str(python), "-m", "pip", "install", "-q", "--no-deps", "-e", str(REPO)])
    return freeze(python)


def freeze(python: Path) -> dict[str, str]:
    text = run([str(python), "-m", "pip", "freeze", "--exclude-editable"], capture_output=True, text=True).stdout
    return read_pins(text)


def print_drift(installed: dict[str, str]) -> None:
    tested = read_pins(TESTED.read_text()) if TESTED.exists() else {}
    direct = {canonical(specifiers(line)[0]) for line in requirement_lines()}
    changed = sorted(name for name in installed.keys() | tested.keys() if installed.get(name) != tested.get(name))
    print(f"\n{len(changed)} package(s) differ from {TESTED.name} (* = a direct requirement):")
    for name in changed:
        print(f"  {'*' if name in direct else ' '} {name}: tested {tested.get(name, '-')}, "
              f"now {installed.get(name, '-')}")


def pytest(python: Path, args: list[str]) -> int:
    print("+", python, "-m pytest", *args, flush=True)
    return subprocess.run([str(python), "-m", "pytest", *args], cwd=REPO).returncode


def readme_table() -> str:
    """README's table: each direct requirement, the version tested and what setup.cfg allows."""
    tested = read_pins(TESTED.read_text())
    rows, seen = [], set()
    for line in requirement_lines():
        name, specs = specifiers(line)
        if canonical(name) not in seen:
            seen.add(canonical(name))
            rows.append(f"| {name} | {tested.get(canonical(name), '-')} | `{','.join(specs) or 'any'}` |")
    return "\n".join([TABLE_START, "| package | tested | setup.cfg allows |", "| --- | --- | --- |", *rows,
                      TABLE_END])


def write_tested(installed: dict[str, str]) -> None:
    TESTED.write_text(HEADER + "".join(f"{name}=={version}\n" for name, version in sorted(installed.items())))
    text = SETUP_CFG.read_text()
    for line in requirement_lines():
        name, specs = specifiers(line)
        version = installed.get(canonical(name))
        if version is None:
            continue
        kept = [s for s in specs if not s.startswith(("<", "==", "~="))]
        text = re.sub(rf"(?m)^([ \t]*){re.escape(line)}[ \t]*$",
                      lambda m: f"{m.group(1)}{name}{','.join(kept + [f'<={version}'])}", text, count=1)
    SETUP_CFG.write_text(text)
    readme = README.read_text()
    start, end = readme.index(TABLE_START), readme.index(TABLE_END) + len(TABLE_END)
    README.write_text(readme[:start] + readme_table() + readme[end:])
    print(f"wrote {TESTED.name}, setup.cfg's upper bounds and README's table of tested versions")


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("newest", "refresh", "oldest", "record"):
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 1
    command, pytest_args = argv[0], argv[1:]
    if command == "refresh" and pytest_args:
        print("error: refresh runs the whole suite; give no pytest arguments", file=sys.stderr)
        return 1
    if command == "record":
        if len(pytest_args) != 1 or not (Path(pytest_args[0]) / "bin" / "python").exists():
            print("error: record takes one virtual environment folder, e.g. .venv", file=sys.stderr)
            return 1
        write_tested(freeze(Path(pytest_args[0]) / "bin" / "python"))
        return 0
    if command == "oldest":
        python = fresh_venv(REPO / ".venv-oldest")
        floors = [lower_bound(line) for line in requirement_lines() if canonical(specifiers(line)[0]) in OLDEST_CHECKED]
        run([str(python), "-m", "pip", "install", "-q", "-c", str(TESTED), "-e", f"{REPO}[dev]"])
        run([str(python), "-m", "pip", "install", "-q", "--no-deps", *floors])
        return pytest(python, pytest_args or OLDEST_TESTS)
    python = fresh_venv(REPO / ".venv-newest")
    installed = install_newest(python)
    print_drift(installed)
    code = pytest(python, pytest_args)
    if command == "refresh":
        if code != 0:
            print(f"the suite failed on the newest releases: {TESTED.name} and setup.cfg left as they were",
                  file=sys.stderr)
        else:
            write_tested(installed)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
