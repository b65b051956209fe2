"""The project's layers: `core/` under everything, `data/`, `modeling/` and `losses/` above it, and
`trainer/` on top; and a trainer and an evaluation that check what they are given before they
load torch."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from tests.test_trainer import DEMO, REPO

HEAVY = ("torch", "torchvision", "transformers", "timm", "accelerate", "numpy")


def _imported_packages(package: str) -> dict[str, set[str]]:
    """{source file: the top-level packages it imports} for every file of `package`."""
    found = {}
    for path in sorted((REPO / package).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(REPO))] = names
    return found


@pytest.mark.parametrize("package", ["core", "data", "modeling", "losses"])
def test_the_lower_layers_never_import_the_trainer(package):
    offenders = {path: names & {"trainer", "bench"} for path, names in _imported_packages(package).items()}
    assert not {path: names for path, names in offenders.items() if names}


def test_the_models_take_nothing_from_the_data_pipeline():
    """modeling/ owns its input normalisation (core.normalization), not data.transforms."""
    assert not {path for path, names in _imported_packages("modeling").items() if "data" in names}


def test_core_imports_only_the_standard_library():
    offenders = {path: names - set(sys.stdlib_module_names) - {"core", "__future__"}
                 for path, names in _imported_packages("core").items()}
    assert not {path: names for path, names in offenders.items() if names}


@pytest.mark.parametrize("args, expected", [
    (["--help"], "usage: trainer/main.py"),
    (["--config", DEMO, "train.epochs=0"], "error: bad value for config key 'train.epochs'"),
    (["--config", DEMO, "data.student_size=100"], "multiple of 32"),
])
def test_help_and_configuration_mistakes_answer_before_torch_loads(args, expected):
    _assert_answers_light(["trainer/main.py", *args], expected)


@pytest.mark.parametrize("args, expected", [
    (["--checkpoint", "runs/no_such_run/student_best", "--data", "data/samples"],
     "error: runs/no_such_run/student_best does not exist; pass a folder written by training"),
    (["--checkpoint", "data/samples", "--data", "data/no_such_folder"], "error: --data data/no_such_folder: no such"),
])
def test_evaluate_argument_mistakes_answer_before_torch_loads(args, expected):
    """Under a 2-process launch each process paid about 6 s of imports before it said so."""
    _assert_answers_light(["-m", "trainer.evaluate", *args], expected)


def _assert_answers_light(command: list[str], expected: str) -> None:
    done = subprocess.run([sys.executable, "-X", "importtime", *command], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert expected in done.stdout + done.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert imported and not imported & set(HEAVY), sorted(imported & set(HEAVY))
