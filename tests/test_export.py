"""ONNX export: verified against PyTorch, and a failed export never leaves a bad file behind."""

from __future__ import annotations

import json

import onnx
import pytest
import torch

from trainer.export import ExportError, export_student, main


def test_export_is_checked_and_records_what_it_accepts(student, tmp_path):
    path = tmp_path / "student.onnx"
    report = export_student(student, path, size=64)
    assert report["max_abs_diff_vs_pytorch"] < 1e-4
    # The TorchScript exporter fixes H and W (timm's MobileViT counts patches in Python).
    assert (report["dynamic_batch"], report["dynamic_hw"], report["accepted_sizes"]) == (True, False, "64x64 only")
    metadata = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert metadata["input"] == "image" and json.loads(metadata["mean"]) == [0.485, 0.456, 0.406]
    assert json.loads((tmp_path / "student.onnx.json").read_text()) == report
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student.onnx", "student.onnx.json"]  # no .tmp_


def test_non_finite_student_is_not_exported_and_the_previous_file_stays(student, tmp_path):
    path = tmp_path / "student.onnx"
    export_student(student, path, size=64)
    good = path.read_bytes()
    broken = type(student)(decoder_width=16, head_width=8)
    with torch.no_grad():
        for p in broken.decoder.parameters():
            p.fill_(float("nan"))
    with pytest.raises(ExportError, match="differs from PyTorch"):
        export_student(broken, path, size=64)
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student.onnx", "student.onnx.json"]


def test_cli_reports_failure_with_exit_code(tmp_path, capsys):
    assert main(["--checkpoint", str(tmp_path / "missing"), "--size", "64"]) == 1
    assert "not a student folder" in capsys.readouterr().err
