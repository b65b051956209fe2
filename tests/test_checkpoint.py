"""Checkpoints never cost a good one: atomic training states, keep-last-K, a full disk, and the
deploy copy of the student refusing non-finite weights."""

from __future__ import annotations

import errno

import pytest
import torch
from accelerate import Accelerator
from torch import nn

from trainer.train.checkpoint import (COMPLETE_MARKER, CheckpointError, complete_states, load_training_state,
                                      resume_candidates, save_student, save_training_state)


@pytest.fixture
def accelerator():
    return Accelerator(cpu=True)  # a fresh one per test: its own list of prepared objects


@pytest.fixture
def prepared(accelerator):
    model = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    return accelerator.prepare(model, optimizer)


def test_states_are_complete_and_only_the_last_k_are_kept(accelerator, prepared, tmp_path):
    model, _ = prepared
    for step in (1, 2, 3, 4):
        path = save_training_state(accelerator, tmp_path, step, keep_last=2)
        assert path is not None and (path / COMPLETE_MARKER).read_text() == f"{step}\n"
    assert [p.name for p in complete_states(tmp_path)] == ["step_00000003", "step_00000004"]
    assert not list((tmp_path / "checkpoints").glob(".tmp_*"))


@pytest.mark.parametrize("disk_full_error", [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError("PytorchStreamWriter failed writing file data/0: No space left on device"),  # torch.save
])
def test_a_full_disk_keeps_the_previous_state(accelerator, prepared, tmp_path, monkeypatch, caplog, disk_full_error):
    model, _ = prepared
    with torch.no_grad():
        model.weight.fill_(1.0)
    save_training_state(accelerator, tmp_path, 1, keep_last=1)

    def disk_full(output_dir, **kwargs):
        (tmp_path / "checkpoints" / ".tmp_step_00000002" / "model.safetensors").write_bytes(b"partial")
        raise disk_full_error

    monkeypatch.setattr(accelerator, "save_state", disk_full)
    assert save_training_state(accelerator, tmp_path, 2, keep_last=1) is None
    assert "No space left on device" in caplog.text and "previous states are kept" in caplog.text
    assert [p.name for p in complete_states(tmp_path)] == ["step_00000001"]  # keep_last=1 deleted nothing
    assert not (tmp_path / "checkpoints" / ".tmp_step_00000002").exists()
    monkeypatch.undo()
    with torch.no_grad():
        model.weight.fill_(5.0)
    assert load_training_state(accelerator, resume_candidates(tmp_path, "latest")).name == "step_00000001"
    assert torch.equal(model.weight, torch.ones_like(model.weight))


def test_resume_refuses_what_is_not_a_complete_state(tmp_path):
    with pytest.raises(CheckpointError, match="no complete training state"):
        resume_candidates(tmp_path, "latest")
    partial = tmp_path / "checkpoints" / "step_00000005"
    partial.mkdir(parents=True)  # a folder without its marker: a save that never finished
    with pytest.raises(CheckpointError, match="not a complete training state"):
        resume_candidates(tmp_path, str(partial))
    assert complete_states(tmp_path) == []
    with pytest.raises(CheckpointError, match="no such"):
        resume_candidates(tmp_path, str(tmp_path / "nowhere"))


def test_student_copy_refuses_non_finite_weights_and_keeps_the_previous(student, tmp_path, caplog):
    target = tmp_path / "student_best"
    assert save_student(student, target)
    before = (target / "model.safetensors").read_bytes()
    broken = type(student)(decoder_width=16, head_width=8)
    with torch.no_grad():
        next(broken.parameters()).fill_(float("nan"))
    assert not save_student(broken, target)
    # NaN in BatchNorm running stats only (a forward that overflowed): refused too.
    broken = type(student)(decoder_width=16, head_width=8)
    next(b for name, b in broken.named_buffers() if name.endswith("running_var")).fill_(float("inf"))
    assert not save_student(broken, target)
    assert "non-finite" in caplog.text
    assert (target / "model.safetensors").read_bytes() == before


def test_states_are_ordered_by_the_step_their_marker_records(tmp_path):
    """A folder name says nothing once a user copies or renames a state; the marker does."""
    root = tmp_path / "checkpoints"
    for name, step in (("step_00000009", 9), ("step_00000010_copy", 10), ("step_00000002", 2)):
        (root / name).mkdir(parents=True)
        (root / name / COMPLETE_MARKER).write_text(f"{step}\n")
    (root / "step_00000099").mkdir()  # no marker: unfinished
    assert [p.name for p in complete_states(tmp_path)] == ["step_00000002", "step_00000009", "step_00000010_copy"]
