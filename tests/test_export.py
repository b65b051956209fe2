"""ONNX export: verified against PyTorch, and a failed export never leaves a bad file behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import onnxruntime
import pytest
import torch

from trainer.ship.export import ExportError, export_student, main


def test_export_takes_any_multiple_of_64_and_records_what_it_checked(student, tmp_path):
    path = tmp_path / "student.onnx"
    report = export_student(student, path, size=64)
    assert report["max_abs_diff_vs_pytorch"] < 1e-4
    assert (report["dynamic_batch"], report["dynamic_hw"], report["size_multiple"]) == (True, True, 64)
    assert report["accepted_sizes"] == "any H and W that are multiples of 64"
    assert report["checked_sizes"] == [[64, 64], [128, 128], [64, 192]]
    # Fidelity in depth terms on the shipped photos: fp32 onnxruntime is PyTorch to rounding.
    fidelity = report["fidelity"]
    assert fidelity["num_images"] == 8 and fidelity["size"] == [64, 64]
    assert fidelity["aligned_abs_rel"] < 1e-5 and fidelity["aligned_delta1"] == 1.0 and fidelity["max_abs_diff"] < 1e-4
    metadata = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert metadata["input"] == "image" and json.loads(metadata["mean"]) == [0.485, 0.456, 0.406]
    assert metadata["size_multiple"] == "64"
    assert json.loads((tmp_path / "student.onnx.json").read_text()) == report
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student.onnx", "student.onnx.json"]  # no .tmp_

    # The file itself, at three sizes it was not traced at (one not square), batch 3.
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for height, width in ((128, 64), (192, 192), (256, 128)):
        images = torch.randn(3, 3, height, width, generator=torch.Generator().manual_seed(height + width))
        with torch.no_grad():
            expected = student(images)
        got = torch.from_numpy(session.run(None, {"image": images.numpy()})[0])
        assert got.shape == (3, 1, height, width)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_export_at_a_multiple_of_32_only_is_fixed_size_and_says_so(student, tmp_path):
    report = export_student(student, tmp_path / "student.onnx", size=96)
    assert (report["dynamic_hw"], report["size_multiple"], report["checked_sizes"]) == (False, None, [[96, 96]])
    assert report["accepted_sizes"].startswith("96x96 only")


@pytest.mark.parametrize("preset", [{"decoder": "lean"}, {"decoder": "dpt", "decoder_width": 16, "head_width": 8}])
def test_each_decoder_preset_builds_and_exports(preset, tmp_path):
    from modeling import StudentDepthModel

    torch.manual_seed(0)
    report = export_student(StudentDepthModel(**preset).eval(), tmp_path / "student.onnx", size=64)
    assert report["dynamic_hw"] and report["max_abs_diff_vs_pytorch"] < 1e-4


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
    assert capsys.readouterr().err == (f"error: {tmp_path / 'missing'} does not exist; pass a folder written by "
                                       f"training, e.g. runs/<run_name>/student_best\n")
    (tmp_path / "empty").mkdir()
    assert main(["--checkpoint", str(tmp_path / "empty"), "--size", "64"]) == 1
    assert "is not a student folder (no config.json)" in capsys.readouterr().err


# --- the CLI ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run_dir(student, tmp_path_factory) -> Path:
    """runs/<name>/ holding student_best/, trained at 64 (config.json records it), and student_old/,
    saved before input_size was recorded."""
    from modeling import StudentDepthModel

    folder = tmp_path_factory.mktemp("run")
    trained_at_64 = StudentDepthModel(decoder_width=16, head_width=8, input_size=64)
    trained_at_64.load_state_dict(student.state_dict())
    trained_at_64.save_pretrained(folder / "student_best")
    # Saved before input_size and decoder names were recorded: a MiniDPT with its widths only.
    StudentDepthModel(decoder="dpt", decoder_width=16, head_width=8).save_pretrained(folder / "student_old")
    config = json.loads((folder / "student_old" / "config.json").read_text())
    old = {key: config[key] for key in ("backbone", "decoder_width", "head_width")}
    (folder / "student_old" / "config.json").write_text(json.dumps(old))
    return folder


@pytest.fixture
def fake_export(monkeypatch) -> list[dict]:
    """Replaces the export itself (seconds) by a record of its arguments, for tests of the CLI's choices."""
    calls = []

    def record(student, path, size, *args):
        calls.append({"student": student, "path": path, "size": size})
        return {"export_size": [size, size]}

    monkeypatch.setattr("trainer.ship.export.export_student", record)
    return calls


def _one_error_line(capsys) -> str:
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "\n" not in error, error
    return error


def test_cli_exports_at_the_recorded_size_next_to_the_checkpoint(run_dir, capsys):
    onnx_path = run_dir / "student.onnx"
    assert main(["--checkpoint", str(run_dir / "student_best")]) == 0
    out = capsys.readouterr().out
    report_text, wrote = out.rsplit("\n", 2)[0], out.rstrip("\n").rsplit("\n", 1)[1]
    assert json.loads(report_text)["export_size"] == [64, 64]
    assert wrote == f"wrote {onnx_path.resolve()} and {onnx_path.resolve()}.json"
    assert json.loads((run_dir / "student.onnx.json").read_text())["accepted_sizes"] == (
        "any H and W that are multiples of 64")
    # The run's own ONNX file is not replaced by a second export without --overwrite.
    written = onnx_path.read_bytes()
    assert main(["--checkpoint", str(run_dir / "student_best"), "--size", "96"]) == 1
    assert _one_error_line(capsys) == (f"error: {onnx_path} already exists (and student.onnx.json); pass "
                                       f"--overwrite to replace it or choose another --output")
    assert onnx_path.read_bytes() == written


def test_cli_overwrite(run_dir, tmp_path, fake_export, capsys):
    output = tmp_path / "student.onnx"
    output.write_bytes(b"old")
    assert main(["--checkpoint", str(run_dir / "student_best"), "--output", str(output), "--overwrite"]) == 0
    assert fake_export[0]["path"] == output and fake_export[0]["size"] == 64


def test_cli_old_checkpoint_exports_at_256_and_says_so(run_dir, tmp_path, fake_export, capsys):
    output = tmp_path / "old.onnx"
    assert main(["--checkpoint", str(run_dir / "student_old"), "--output", str(output)]) == 0
    assert fake_export[0]["size"] == 256 and fake_export[0]["student"].input_size is None
    assert type(fake_export[0]["student"].decoder).__name__ == "MiniDPT"  # what such folders hold
    assert capsys.readouterr().err.strip() == (f"info: {run_dir / 'student_old'} records no input_size (saved before "
                                               f"it was recorded); exporting at 256x256 (pass --size to choose)")
    assert main(["--checkpoint", str(run_dir / "student_old"), "--output", str(tmp_path / "b.onnx"),
                 "--size", "128"]) == 0
    assert fake_export[1]["size"] == 128


def test_cli_refuses_bad_outputs_before_loading(run_dir, tmp_path, fake_export, capsys):
    checkpoint = ["--checkpoint", str(run_dir / "student_best")]
    (tmp_path / "student.onnx.json").write_text("mine")
    cases = {
        str(tmp_path / "student.pt"): f"--output {tmp_path / 'student.pt'} must end in .onnx",
        str(tmp_path / "missing" / "s.onnx"): (f"folder {tmp_path / 'missing'} for --output does not exist; create "
                                               f"it or choose another --output"),
        str(tmp_path / "student.onnx"): (f"{tmp_path / 'student.onnx.json'} already exists; pass --overwrite to "
                                         f"replace it or choose another --output"),
    }
    (tmp_path / "folder.onnx").mkdir()
    cases[str(tmp_path / "folder.onnx")] = (f"--output {tmp_path / 'folder.onnx'} is a folder; give a file path "
                                            f"ending in .onnx")
    for output, expected in cases.items():
        assert main([*checkpoint, "--output", output]) == 1
        assert _one_error_line(capsys) == f"error: {expected}"
    assert main([*checkpoint, "--output", str(tmp_path / "a.onnx"), "--size", "100"]) == 1
    assert "--size 100 must be a positive multiple of 32" in _one_error_line(capsys)
    assert fake_export == [] and (tmp_path / "student.onnx.json").read_text() == "mine"


def test_cli_corrupt_checkpoint_is_one_line(run_dir, tmp_path, fake_export, capsys):
    folder = tmp_path / "student_best"
    shutil.copytree(run_dir / "student_best", folder)
    (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:100])
    assert main(["--checkpoint", str(folder)]) == 1
    assert "model.safetensors is corrupt or truncated" in _one_error_line(capsys)
    assert fake_export == [] and not (tmp_path / "student.onnx").exists()
