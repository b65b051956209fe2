"""trainer.ship.predict and trainer.ship.quantize on the tiny student, exported to ONNX at 64x64 (a
file that takes any multiple of 64)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import ExifTags, Image

from trainer.ship import export, predict, quantize

SIZE = 64
# name -> (stored width, height), EXIF orientation; orientation 6 (rotate 90 degrees) swaps the sides.
PHOTOS = {"wide.png": ((48, 32), None), "tall.jpg": ((30, 50), None), "rotated.jpg": ((64, 40), 6)}
UPRIGHT_SIZES = {"wide": (48, 32), "tall": (30, 50), "rotated": (40, 64), "wide_1": (36, 36)}


@pytest.fixture(scope="module")
def models(tmp_path_factory, student) -> tuple[Path, Path]:
    """(checkpoint folder recording input_size 64, ONNX file) of the same tiny student. The ONNX
    file comes from the export CLI without --size, so exported at the recorded size."""
    from modeling import StudentDepthModel

    folder = tmp_path_factory.mktemp("models")
    trained_at_64 = StudentDepthModel(decoder_width=16, head_width=8, input_size=SIZE)
    trained_at_64.load_state_dict(student.state_dict())
    trained_at_64.save_pretrained(folder / "student")
    assert export.main(["--checkpoint", str(folder / "student")]) == 0
    return folder / "student", folder / "student.onnx"


@pytest.fixture(scope="module")
def old_checkpoint(tmp_path_factory, student) -> Path:
    """A student folder saved before config.json recorded input_size."""
    folder = tmp_path_factory.mktemp("old") / "student"
    student.save_pretrained(folder)
    assert "input_size" not in _without_new_keys(folder)
    return folder


def _without_new_keys(folder: Path) -> dict:
    config = json.loads((folder / "config.json").read_text())
    config = {key: value for key, value in config.items() if key not in ("input_size", "image_mean", "image_std")}
    (folder / "config.json").write_text(json.dumps(config))
    return config


def _one_error_line(capsys) -> str:
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "\n" not in error, error
    return error


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
    # No size: the checkpoint runs at the input_size it recorded, as its ONNX export does.
    output = tmp_path_factory.mktemp("checkpoint_maps")
    written = predict.predict_paths([photos / "photos", photos / "other" / "wide.jpg"], models[0], output,
                                    save_npy=True, batch_size=2)
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
    # No --size on either side: the file's fixed 64x64 input, and the checkpoint's recorded 64.
    code = predict.main([str(photos / "photos"), str(photos / "other" / "wide.jpg"), "--model", str(models[1]),
                         "--output", str(output), "--npy"])
    assert code == 0
    assert capsys.readouterr().out.strip() == (f"wrote 4 depth maps to {output} (1 skipped: unreadable, see the "
                                               f"warnings above)")
    assert [r.getMessage() for r in caplog.records if "broken.jpg" in r.getMessage()][0].startswith(
        "skipping unreadable image")
    for stem in UPRIGHT_SIZES:
        np.testing.assert_allclose(np.load(output / f"{stem}_depth.npy"),
                                   np.load(checkpoint_maps[1] / f"{stem}_depth.npy"), rtol=0, atol=1e-3)


def test_cli_checkpoint_and_its_onnx_agree_without_size(models, photos, tmp_path, capsys):
    photo = str(photos / "photos" / "tall.jpg")
    for model, name in zip(models, ("checkpoint", "onnx")):
        assert predict.main([photo, "--model", str(model), "--output", str(tmp_path / name), "--npy"]) == 0
        assert capsys.readouterr().out.strip() == f"wrote 1 depth map to {tmp_path / name}"
    from_checkpoint, from_onnx = (np.load(tmp_path / name / "tall_depth.npy") for name in ("checkpoint", "onnx"))
    assert from_checkpoint.shape == (50, 30)
    assert np.abs(from_checkpoint - from_onnx).max() < 1e-3


def test_cli_old_checkpoint_runs_at_256_and_says_so(old_checkpoint, photos, tmp_path, capsys):
    code = predict.main([str(photos / "photos" / "wide.png"), "--model", str(old_checkpoint),
                         "--output", str(tmp_path / "out")])
    assert code == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == f"wrote 1 depth map to {tmp_path / 'out'}"
    assert captured.err.strip() == (f"info: {old_checkpoint} records no input_size (saved before it was recorded); "
                                    f"running at 256x256 (pass --size to choose)")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["wide_depth.png"]  # no .npy without --npy


def test_cli_without_a_readable_image_fails(models, photos, tmp_path, capsys):
    code = predict.main([str(photos / "photos" / "broken.jpg"), str(tmp_path / "missing.png"),
                         "--model", str(models[1]), "--output", str(tmp_path / "out")])
    assert code == 1
    captured = capsys.readouterr()
    assert captured.out.strip() == (f"wrote 0 depth maps to {tmp_path / 'out'} (2 skipped: unreadable, see the "
                                    f"warnings above)")
    assert captured.err.strip() == "error: none of the 2 inputs could be read as an image"


def test_cli_fixed_size_onnx_refuses_another_size(student, photos, tmp_path, capsys):
    fixed = tmp_path / "fixed.onnx"
    export.export_student(student, fixed, 96)  # 96 is not a multiple of 64: a fixed-size file
    code = predict.main([str(photos / "photos"), "--model", str(fixed), "--output", str(tmp_path / "out"),
                         "--size", "128"])
    assert code == 1
    assert _one_error_line(capsys) == (f"error: {fixed} accepts 96x96 inputs only, not 128x128; leave out --size "
                                       f"or pass --size 96")
    assert not (tmp_path / "out").exists()


def test_cli_onnx_runs_at_other_multiples_of_64_and_refuses_the_rest(models, photos, tmp_path, capsys):
    checkpoint, onnx_file = models
    photo = str(photos / "photos" / "wide.png")
    assert predict.main([photo, "--model", str(onnx_file), "--output", str(tmp_path / "onnx"), "--size", "128",
                         "--npy"]) == 0
    assert predict.main([photo, "--model", str(checkpoint), "--output", str(tmp_path / "torch"), "--size", "128",
                         "--npy"]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "onnx" / "wide_depth.npy"),
                               np.load(tmp_path / "torch" / "wide_depth.npy"), rtol=0, atol=1e-4)
    capsys.readouterr()
    code = predict.main([photo, "--model", str(onnx_file), "--output", str(tmp_path / "out"), "--size", "96"])
    assert code == 1
    assert _one_error_line(capsys) == (f"error: {onnx_file} accepts sizes that are multiples of 64 only, not 96; "
                                       f"pass e.g. --size 128")
    assert not (tmp_path / "out").exists()


def _dynamic_onnx_that_only_takes_64(path: Path, batch: int) -> None:
    """A graph whose H and W are declared dynamic but which only works at 64x64: it reshapes its input
    to (batch, 3, 64, 64). With batch -1 another size can still run, giving maps of the wrong shape."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Reshape", ["image", "shape"], ["fixed"]),
         helper.make_node("ReduceMean", ["fixed"], ["disparity"], axes=[1], keepdims=1)],
        "only_64",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, "height", "width"])],
        [helper.make_tensor_value_info("disparity", TensorProto.FLOAT, ["batch", 1, 64, 64])],
        [helper.make_tensor("shape", TensorProto.INT64, [4], [batch, 3, 64, 64])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.metadata_props.add(key="accepted_sizes", value="64x64 only")
    onnx.save(model, str(path))


@pytest.mark.parametrize("batch, failure", [
    (1, "refuses 256x256 inputs ("),
    (-1, "gives (16, 1, 64, 64) for 1 inputs of 256x256, not (1, 1, 256, 256)"),
])
def test_cli_onnx_refusing_the_size_names_what_it_accepts(photos, tmp_path, capsys, batch, failure):
    model = tmp_path / "only_64.onnx"
    _dynamic_onnx_that_only_takes_64(model, batch)
    photo = str(photos / "photos" / "wide.png")
    assert predict.main([photo, "--model", str(model), "--output", str(tmp_path / "out")]) == 1
    error = _one_error_line(capsys)
    assert error.startswith(f"error: {model} {failure}") and error.endswith("; it accepts 64x64 only")
    assert not (tmp_path / "out").exists()  # refused before anything was written
    assert predict.main([photo, "--model", str(model), "--output", str(tmp_path / "out"), "--size", "64"]) == 0


def test_cli_output_that_is_a_file(models, photos, tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("notes")
    assert predict.main([str(photos / "photos"), "--model", str(models[1]), "--output", str(readme)]) == 1
    assert _one_error_line(capsys) == f"error: --output {readme} is a file; give a folder (it is created if missing)"
    assert readme.read_text() == "notes"


@pytest.mark.parametrize("damage, expected", [
    ("no_config", "is not a student folder (no config.json)"),
    ("truncated_weights", "model.safetensors is corrupt or truncated"),
    ("not_onnx", "broken.onnx is not an ONNX model ("),
])
def test_cli_corrupt_model(models, photos, tmp_path, capsys, damage, expected):
    model = tmp_path / ("broken.onnx" if damage == "not_onnx" else "student")
    if damage == "not_onnx":
        model.write_bytes(b"junk")
    else:
        model.mkdir()
    if damage == "truncated_weights":
        (model / "config.json").write_text((models[0] / "config.json").read_text())
        (model / "model.safetensors").write_bytes((models[0] / "model.safetensors").read_bytes()[:1000])
    assert predict.main([str(photos / "photos"), "--model", str(model), "--output", str(tmp_path / "out")]) == 1
    assert expected in _one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_cli_refuses_to_overwrite_before_loading_the_model(models, photos, tmp_path, capsys, monkeypatch):
    output = tmp_path / "depth"
    output.mkdir()
    (output / "rotated_depth.png").write_bytes(b"mine")
    (output / "wide_depth.npy").write_bytes(b"mine too")
    arguments = [str(photos / "photos"), "--model", str(models[1]), "--output", str(output), "--npy"]
    with monkeypatch.context() as patched:
        patched.setattr(predict, "load_model", lambda *args: pytest.fail("the model was loaded"))
        assert predict.main(arguments) == 1
    assert _one_error_line(capsys) == (f"error: {output}/ already holds rotated_depth.png (and 1 more); pass "
                                       f"--overwrite to replace them or choose another --output")
    assert (output / "rotated_depth.png").read_bytes() == b"mine"
    assert predict.main([*arguments, "--overwrite"]) == 0
    assert (output / "rotated_depth.png").read_bytes() != b"mine"


def test_cli_never_writes_over_an_input_photo(models, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("cat.png", "cat_depth.png"):
        Image.new("RGB", (40, 30), (200, 100, 50)).save(folder / name)
    before = (folder / "cat_depth.png").read_bytes()
    assert predict.main([str(folder), "--model", str(models[1]), "--output", str(folder), "--overwrite"]) == 1
    assert _one_error_line(capsys) == (f"error: {folder / 'cat_depth.png'} would replace the input photo "
                                       f"{folder / 'cat_depth.png'}; choose another --output")
    assert (folder / "cat_depth.png").read_bytes() == before


def test_cli_side_by_side(models, photos, tmp_path, capsys):
    import matplotlib

    output = tmp_path / "out"
    assert predict.main([str(photos / "photos" / "wide.png"), "--model", str(models[1]), "--output", str(output),
                         "--side-by-side"]) == 0
    assert sorted(p.name for p in output.iterdir()) == ["wide_compare.png", "wide_depth.png"]
    compare = np.asarray(Image.open(output / "wide_compare.png"))
    photo = np.asarray(Image.open(photos / "photos" / "wide.png"))
    depth = np.asarray(Image.open(output / "wide_depth.png"))
    width, height = UPRIGHT_SIZES["wide"]
    assert compare.shape[0] == height and 2 * width + 10 < compare.shape[1] <= 2 * width + 80
    assert np.array_equal(compare[:, :width], photo) and np.array_equal(compare[:, width:2 * width], depth)
    # The colour bar runs from the colormap's high end (near) at the top to its low end (far) at the bottom.
    near, far = (np.round(np.array(matplotlib.colormaps["Spectral_r"](end)[:3]) * 255) for end in (1.0, 0.0))
    legend = compare[:, 2 * width:].astype(float)
    bar_columns = [x for x in range(legend.shape[1])
                   if np.array_equal(legend[0, x], near) and np.array_equal(legend[-1, x], far)]
    assert len(bar_columns) >= 5


def test_side_by_side_of_a_tall_photo_is_scaled_down():
    photo = Image.new("RGB", (40, 2048), (10, 20, 30))
    compare = predict.side_by_side_image(photo, photo.copy(), "magma")
    assert compare.height == predict.COMPARE_MAX_HEIGHT and compare.width > 2 * 20


def test_output_stems_are_unique_and_deterministic():
    paths = [Path("a/x.jpg"), Path("b/x.png"), Path("c/X.jpg"), Path("x_1.jpg")]
    assert predict.output_stems(paths) == ["x", "x_1", "X_2", "x_1_1"]


def test_predictor_sizes(models):
    assert predict.onnx_input_size(models[1], 256) == 256  # any multiple of 64
    with pytest.raises(ValueError, match="multiples of 64 only, not 96"):
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
    assert 0 < report["max_abs_diff"] < 0.1 and report["mean_abs_diff"] < 0.01 * report["mean_abs_reference"]
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


@pytest.mark.parametrize("content", [b"not a model", b"", "truncated"])
def test_quantize_cli_failure_leaves_fp32_alone(models, photos, tmp_path, capsys, content):
    calibration = ["--calibration", str(photos / "photos")]
    broken = tmp_path / "broken.onnx"
    content = models[1].read_bytes()[:5000] if content == "truncated" else content
    broken.write_bytes(content)
    assert quantize.main(["--onnx", str(broken), "--output", str(tmp_path / "int8.onnx"), *calibration]) == 1
    assert broken.read_bytes() == content and not (tmp_path / "int8.onnx").exists()
    _one_error_line(capsys)


def test_quantize_cli_refuses_to_overwrite(models, photos, tmp_path, capsys):
    calibration = ["--calibration", str(photos / "photos")]
    fp32_bytes = models[1].read_bytes()
    assert quantize.main(["--onnx", str(models[1]), "--output", str(models[1]), "--overwrite", *calibration]) == 1
    assert _one_error_line(capsys) == f"error: --output {models[1]} is the fp32 model itself; choose another path"
    assert models[1].read_bytes() == fp32_bytes
    mine = tmp_path / "int8.onnx"
    mine.write_bytes(b"mine")
    assert quantize.main(["--onnx", str(models[1]), "--output", str(mine), *calibration]) == 1
    assert _one_error_line(capsys) == (f"error: {mine} already exists; pass --overwrite to replace it or choose "
                                       f"another --output")
    report = tmp_path / "report.json"
    report.write_text("mine")
    assert quantize.main(["--onnx", str(models[1]), "--output", str(tmp_path / "new.onnx"), "--json", str(report),
                          *calibration]) == 1
    assert "report.json already exists; pass --overwrite" in _one_error_line(capsys)
    assert mine.read_bytes() == b"mine" and report.read_text() == "mine" and not (tmp_path / "new.onnx").exists()


def test_quantize_cli_json_into_a_missing_folder(models, photos, tmp_path, capsys):
    report = tmp_path / "missing" / "report.json"
    assert quantize.main(["--onnx", str(models[1]), "--output", str(tmp_path / "int8.onnx"), "--json", str(report),
                          "--calibration", str(photos / "photos")]) == 1
    assert _one_error_line(capsys) == (f"error: folder {report.parent} for --json does not exist; create it or "
                                       f"choose another --json")
    assert not (tmp_path / "int8.onnx").exists()
