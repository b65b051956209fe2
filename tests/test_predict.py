"""trainer.predict and trainer.quantize on the tiny student, exported to ONNX at 64x64."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import ExifTags, Image

from trainer import predict, quantize
from trainer.export import export_student

SIZE = 64
# name -> (stored width, height), EXIF orientation; orientation 6 (rotate 90 degrees) swaps the sides.
PHOTOS = {"wide.png": ((48, 32), None), "tall.jpg": ((30, 50), None), "rotated.jpg": ((64, 40), 6)}
UPRIGHT_SIZES = {"wide": (48, 32), "tall": (30, 50), "rotated": (40, 64), "wide_1": (36, 36)}


@pytest.fixture(scope="module")
def models(tmp_path_factory, student) -> tuple[Path, Path]:
    """(checkpoint folder, fixed-size ONNX file) of the same tiny student."""
    folder = tmp_path_factory.mktemp("models")
    student.save_pretrained(folder / "student")
    export_student(student, folder / "student.onnx", SIZE)
    return folder / "student", folder / "student.onnx"


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """photos/{wide.png, tall.jpg, rotated.jpg, broken.jpg} and other/wide.jpg (same stem as photos/wide.png)."""
    root = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    (root / "photos").mkdir()
    (root / "other").mkdir()
    for name, ((width, height), orientation) in PHOTOS.items():
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        exif = Image.Exif()
        if orientation:
            exif[ExifTags.Base.Orientation] = orientation
        image.save(root / "photos" / name, exif=exif)
    Image.fromarray(rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)).save(root / "other" / "wide.jpg")
    (root / "photos" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    return root


@pytest.fixture(scope="module")
def checkpoint_maps(models, photos, tmp_path_factory) -> tuple[list[Path], Path]:
    output = tmp_path_factory.mktemp("checkpoint_maps")
    written = predict.predict_paths([photos / "photos", photos / "other" / "wide.jpg"], models[0], output,
                                    size=SIZE, save_npy=True, batch_size=2)
    return written, output


def test_checkpoint_maps_have_upright_original_sizes(checkpoint_maps):
    written, output = checkpoint_maps
    # Folder first (sorted, broken.jpg skipped), then the extra file, whose stem was taken.
    assert [path.name for path in written] == ["rotated_depth.png", "tall_depth.png", "wide_depth.png",
                                               "wide_1_depth.png"]
    for stem, (width, height) in UPRIGHT_SIZES.items():
        with Image.open(output / f"{stem}_depth.png") as png:
            assert png.mode == "RGB" and png.size == (width, height)
        disparity = np.load(output / f"{stem}_depth.npy")
        assert disparity.dtype == np.float32 and disparity.shape == (height, width)
        assert np.isfinite(disparity).all() and disparity.std() > 0
    assert not list(output.glob("broken*"))


def test_cli_with_onnx_matches_checkpoint(models, photos, checkpoint_maps, tmp_path, capsys, caplog):
    output = tmp_path / "onnx_maps"
    # No --size: the file's fixed 64x64 input wins over the default 256.
    code = predict.main([str(photos / "photos"), str(photos / "other" / "wide.jpg"), "--model", str(models[1]),
                         "--output", str(output), "--npy"])
    assert code == 0
    assert capsys.readouterr().out.strip() == f"wrote 4 depth maps to {output} (1 skipped)"
    assert [r.getMessage() for r in caplog.records if "broken.jpg" in r.getMessage()][0].startswith(
        "skipping unreadable image")
    for stem in UPRIGHT_SIZES:
        np.testing.assert_allclose(np.load(output / f"{stem}_depth.npy"),
                                   np.load(checkpoint_maps[1] / f"{stem}_depth.npy"), atol=1e-4)


def test_cli_without_a_readable_image_fails(models, photos, tmp_path, capsys):
    code = predict.main([str(photos / "photos" / "broken.jpg"), str(tmp_path / "missing.png"),
                         "--model", str(models[1]), "--output", str(tmp_path / "out")])
    assert code == 1
    assert capsys.readouterr().out.strip() == f"wrote 0 depth maps to {tmp_path / 'out'} (2 skipped)"


def test_output_stems_are_unique_and_deterministic():
    paths = [Path("a/x.jpg"), Path("b/x.png"), Path("c/X.jpg"), Path("x_1.jpg")]
    assert predict.output_stems(paths) == ["x", "x_1", "X_2", "x_1_1"]


def test_predictor_sizes(models):
    assert predict.onnx_input_size(models[1], 256) == SIZE
    with pytest.raises(ValueError, match="accepts 64x64 inputs only"):
        predict.load_predictor(models[1], 96)
    with pytest.raises(ValueError, match="multiple of 32"):
        predict.load_predictor(models[0], 100)


def test_huge_maps_are_coloured_through_a_smaller_copy(monkeypatch):
    disparity = torch.linspace(0, 1, 64 * 48).view(1, 1, 64, 48)
    direct = np.asarray(predict._colour_image(disparity, "Spectral_r"), dtype=np.float32)
    monkeypatch.setattr(predict, "_MAX_COLORIZE_PIXELS", 1000)  # stands in for torch.quantile's 2**24 limit
    reduced = np.asarray(predict._colour_image(disparity, "Spectral_r"), dtype=np.float32)
    assert reduced.shape == direct.shape == (64, 48, 3)
    assert np.abs(reduced - direct).mean() < 4  # of 255: the same picture


def _check_int8(report: dict, fp32_path: Path, op_type: str) -> None:
    int8 = Path(report["int8"])
    assert int8.is_file() and report["int8_bytes"] == int8.stat().st_size
    # The MobileViT-XS encoder holds most of the 8 MB even in the tiny student, so int8 really shrinks it.
    assert report["fp32_bytes"] == fp32_path.stat().st_size and report["int8_bytes"] < 0.4 * report["fp32_bytes"]
    assert op_type in {node.op_type for node in onnx.load(str(int8)).graph.node}
    assert report["num_images"] == 3  # broken.jpg skipped
    assert 0 < report["max_abs_diff"] < 0.1 and report["mean_abs_diff"] < 0.01 * report["mean_abs_fp32"]
    assert report["aligned_abs_rel"] < 0.01 and report["aligned_delta1"] > 0.99
    images = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    disparity = predict.load_predictor(int8, SIZE)(images)
    assert disparity.shape == (2, 1, SIZE, SIZE)
    assert torch.isfinite(disparity).all()


def test_dynamic_quantization(models, photos, tmp_path):
    calibration = sorted((photos / "photos").iterdir())
    report = quantize.quantize_student(models[1], tmp_path / "student.int8.onnx", "dynamic", calibration)
    _check_int8(report, models[1], "ConvInteger")  # Conv is quantised too, not only MatMul
    print(quantize.format_report(report))


@pytest.mark.slow
def test_static_quantization(models, photos, tmp_path):
    # ~15 s on two cores: onnxruntime's QDQ pass is slow Python whatever the image size.
    calibration = sorted((photos / "photos").iterdir())
    report = quantize.quantize_student(models[1], tmp_path / "student.int8.onnx", "static", calibration)
    _check_int8(report, models[1], "QuantizeLinear")
    print(quantize.format_report(report))


def test_quantize_cli_failure_leaves_fp32_alone(models, photos, tmp_path, capsys):
    calibration = ["--calibration", str(photos / "photos")]
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    assert quantize.main(["--onnx", str(broken), "--output", str(tmp_path / "int8.onnx"), *calibration]) == 1
    assert broken.read_bytes() == b"not a model" and not (tmp_path / "int8.onnx").exists()
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "\n" not in error
    fp32_bytes = models[1].read_bytes()
    assert quantize.main(["--onnx", str(models[1]), "--output", str(models[1]), *calibration]) == 1
    assert models[1].read_bytes() == fp32_bytes
