"""Tiny shared fixtures: a random tiny teacher, a small student and a few synthetic photos."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "data" / "samples"

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
# Each pytest-xdist worker gets its share of the cores, and so do the processes its tests start
# (OMP_NUM_THREADS): more threads than cores make torch's OpenMP threads wait on each other.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
THREADS = max(1, min(2, CORES // WORKERS))
torch.set_num_threads(THREADS)
if WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))


def pytest_xdist_auto_num_workers(config):
    """setup.cfg's `-n auto`: a worker per core, at most 4: each holds torch (about 1 GB) and starts
    training processes of its own. PYTEST_XDIST_AUTO_NUM_WORKERS, or `-n N`, says otherwise."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None  # pytest-xdist's own rule reads it
    return min(4, CORES)


@pytest.fixture(scope="session")
def tiny_teacher():
    from modeling import DepthAnythingTeacher

    return DepthAnythingTeacher.tiny()


@pytest.fixture(scope="session")
def student():
    from modeling import StudentDepthModel

    torch.manual_seed(0)
    return StudentDepthModel(decoder_width=16, head_width=8).eval()


def save_student_folder(folder: Path, input_size: int) -> Path:
    """A small seeded random student saved as a checkpoint folder (config.json + model.safetensors)
    that records `input_size`, as a trained one does."""
    from modeling import StudentDepthModel

    torch.manual_seed(0)
    StudentDepthModel(decoder_width=16, head_width=8, input_size=input_size).save_pretrained(folder)
    return folder


@pytest.fixture
def photo_dir(tmp_path: Path) -> Path:
    """Four of the shipped sample photos, copied so a test may add bad files beside them."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for path in sorted(SAMPLES.glob("*.jpg"))[:4]:
        shutil.copy(path, folder / path.name)
    return folder


@pytest.fixture(autouse=True)
def _restore_logging():
    """Entry points called in-process set up logging for a command-line run; undo it, so one
    test's handlers never write into the next test's output."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
