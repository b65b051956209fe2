"""Tests for data/: file discovery, decoding, splitting, transforms and datasets."""

import importlib.util
import io
import logging
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile, UnidentifiedImageError
from torch.utils.data import DataLoader

from data import (
    CROPS,
    IMAGE_EXTENSIONS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransform,
    ImageScan,
    LabeledDepthDataset,
    TrainTransform,
    UnlabeledImageDataset,
    describe_unreadable,
    first_readable,
    list_images,
    load_rgb,
    load_rgb_tensor,
    scan_images,
    split_train_val,
)
from data import images as images_module

SAMPLES = Path(__file__).parents[1] / "data" / "samples"
# Small valid sizes keep the tests fast: 98 = 7 * 14 and 64 = 2 * 32 (each view then stays under
# torch's parallel grain size, so a busy machine's thread contention does not slow the tests).
TEACHER, STUDENT = 98, 64
RAMP_16BIT = np.linspace(0, 65535, 16 * 32).reshape(16, 32).astype(np.uint16)


def _noise_jpeg_bytes(width: int = 128, height: int = 96) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def _png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _tensor(image: Image.Image) -> torch.Tensor:
    """An RGB image as the training datasets hand it to TrainTransform: uint8 (3, H, W)."""
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


def _unnormalize(tensor: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    return tensor * std + mean


def _centroid(view: torch.Tensor) -> torch.Tensor:
    """Intensity-weighted (x, y) centroid of a normalised view, in [0, 1] image coordinates."""
    weight = _unnormalize(view).mean(0).clamp(min=0)  # (H, W), black background -> 0
    height, width = weight.shape
    xs = (torch.arange(width) + 0.5) / width
    ys = (torch.arange(height) + 0.5) / height
    total = weight.sum()
    assert total > 0, "marker not visible"
    return torch.stack([(weight.sum(0) * xs).sum() / total, (weight.sum(1) * ys).sum() / total])


# --- list_images -------------------------------------------------------------------------------


def test_list_images_recursive_case_insensitive_sorted(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ["b.Png", "a.JPG", "sub/c.jpeg"]:
        Image.new("RGB", (4, 4)).save(tmp_path / name, "PNG" if name.endswith("Png") else "JPEG")
    (tmp_path / "notes.txt").write_text("not an image")
    assert [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)] == [
        "a.JPG",
        "b.Png",
        "sub/c.jpeg",
    ]


def test_list_images_missing_and_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        list_images(tmp_path / "nope")
    with pytest.raises(ValueError, match="found under .*; it is empty$"):
        list_images(tmp_path)
    (tmp_path / "notes.txt").write_text("not an image")
    for name in ("a.CR2", "b.cr2", ".DS_Store"):
        (tmp_path / name).write_bytes(b"raw")
    # The one line names what the folder holds instead, e.g. camera RAW files it cannot read.
    with pytest.raises(ValueError, match=r"^no images \(jpg/jpeg/png/webp/bmp/tif/tiff/heic/heif\) found under "
                                         r".*; it holds 2 \.cr2, 1 \(hidden\), 1 \.txt$"):
        list_images(tmp_path)


def test_scan_images_counts_what_it_leaves_out_and_skips_hidden(tmp_path):
    for name in ("b.jpg", "A.HEIC", "c.heif", "notes.txt", "README", "sub/d.png", "sub/e.CR2", "sub/f.cr2",
                 ".DS_Store", "._b.jpg", "sub/.hidden.png", ".thumbnails/b.jpg", ".git/objects/x/y.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")  # never decoded: scanning goes by name
    (tmp_path / "folder.jpg").mkdir()  # a folder with an image's name is not an image
    scan = scan_images(tmp_path)
    assert isinstance(scan, ImageScan)
    assert [p.relative_to(tmp_path).as_posix() for p in scan.images] == ["A.HEIC", "b.jpg", "c.heif", "sub/d.png"]
    # Hidden files and folders count once each; a hidden folder's contents are not walked.
    assert scan.ignored == {".txt": 1, "(no extension)": 1, ".cr2": 2, "(hidden)": 5}
    assert list_images(tmp_path) == scan.images
    assert {".heic", ".heif"} <= set(IMAGE_EXTENSIONS)


# --- load_rgb and the dataset's handling of bad files --------------------------------------------


@pytest.fixture(scope="module")
def image_zoo(tmp_path_factory) -> tuple[Path, dict[str, Path], dict[str, Path]]:
    """One folder holding a readable file of each awkward kind and a few unreadable ones."""
    folder = tmp_path_factory.mktemp("zoo")
    return folder, _write_good_files(folder), _write_bad_files(folder)


def _write_good_files(folder: Path) -> dict[str, Path]:
    paths = {}

    def save(name: str, image: Image.Image, **kwargs) -> None:
        paths[name] = folder / name
        image.save(paths[name], **kwargs)

    save("cmyk.jpg", Image.new("CMYK", (30, 20), (0, 255, 255, 0)))
    save("sixteen_bit.png", Image.fromarray(RAMP_16BIT))
    save("rgba.png", Image.new("RGBA", (16, 16), (200, 100, 50, 128)))
    palette = Image.new("RGB", (16, 16), (10, 200, 30)).convert("P", palette=Image.Palette.ADAPTIVE)
    save("palette.png", palette, transparency=0)
    save("gray.png", Image.new("L", (12, 9), 77))
    # 40x20 stored sideways; orientation 6 says "rotate 90 degrees clockwise to display".
    sideways = Image.new("RGB", (40, 20), (0, 0, 0))
    sideways.paste((255, 0, 0), (0, 0, 8, 8))  # marker in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6
    save("rotated.jpg", sideways, exif=exif, quality=95)
    save("one_pixel.png", Image.new("RGB", (1, 1), (255, 255, 255)))
    save("seven_by_three.png", Image.new("RGB", (7, 3), (1, 2, 3)))
    save("large.jpg", Image.new("RGB", (4000, 3000), (90, 120, 150)), quality=50)
    return paths


def _write_bad_files(folder: Path) -> dict[str, Path]:
    jpeg = _noise_jpeg_bytes()
    contents = {
        "corrupt.jpg": np.random.default_rng(1).integers(0, 256, 2048, dtype=np.uint8).tobytes(),
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "empty.jpg": b"",
        "text.jpg": b"this is not a JPEG, just text with the wrong name\n",
    }
    paths = {}
    for name, content in contents.items():
        paths[name] = folder / name
        paths[name].write_bytes(content)
    return paths


def test_load_rgb_modes_to_8bit_rgb(image_zoo):
    _, paths, _ = image_zoo
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. PIL's palette-transparency warning must not fire
        images = {name: load_rgb(path) for name, path in paths.items()}
    for image in images.values():
        assert image.mode == "RGB"
    sixteen = np.asarray(images["sixteen_bit.png"])
    assert not (sixteen == 255).all()
    assert sixteen.min() == 0 and sixteen.max() == 255
    # Scaled by 255/65535 rather than clipped at 255.
    assert np.abs(sixteen[..., 0].astype(float) - RAMP_16BIT / 257).max() <= 0.5 + 1e-9
    assert images["one_pixel.png"].size == (1, 1)
    assert images["seven_by_three.png"].size == (7, 3)
    cmyk = np.asarray(images["cmyk.jpg"]).astype(int)[10, 15]
    assert cmyk[0] > 200 and cmyk[1] < 60 and cmyk[2] < 60  # C=0, M=Y=255 is red


def test_load_rgb_applies_exif_orientation(image_zoo):
    rotated = load_rgb(image_zoo[1]["rotated.jpg"])
    assert rotated.size == (20, 40)
    pixels = np.asarray(rotated).astype(int)
    # Rotating 90 degrees clockwise moves the stored top-left corner to the top-right.
    assert pixels[2, 17, 0] > 200 and pixels[2, 17, 1] < 60
    assert pixels[2, 2, 0] < 60


def test_load_rgb_max_side(image_zoo):
    _, good, _ = image_zoo
    assert load_rgb(good["large.jpg"], max_side=512).size == (512, 384)
    assert load_rgb(good["seven_by_three.png"], max_side=512).size == (7, 3)
    assert load_rgb(good["seven_by_three.png"], max_side=2).size == (2, 1)


def test_training_decode_is_load_rgb_as_uint8_tensor_and_scales_jpegs_in_the_dct(image_zoo):
    """The training datasets' decode (`load_rgb_tensor`) gives load_rgb's upright RGB pixels for
    every awkward kind (EXIF rotation, CMYK, 16-bit, palette, gray); a large JPEG decodes at the
    smallest DCT scale that keeps both sides >= max_side (4000x3000 at 1/4, since 1/8 is 500 < 512),
    not resized further."""
    _, good, _ = image_zoo
    for name, path in good.items():
        if name != "large.jpg":
            decoded = load_rgb_tensor(path)
            assert decoded.dtype == torch.uint8, name
            assert torch.equal(decoded, _tensor(load_rgb(path))), name
    large = load_rgb_tensor(good["large.jpg"], max_side=512)
    assert large.shape == (3, 750, 1000)
    assert (large.float().mean((1, 2)) - torch.tensor([90.0, 120.0, 150.0])).abs().max() < 3


BAD_FILE_REASONS = {
    "corrupt.jpg": "not an image (unknown format, first bytes ff e4 22 79)",
    "truncated.jpg": "truncated JPEG",
    "empty.jpg": "empty file",
    "text.jpg": "not an image (text)",
}


def test_dataset_marks_unreadable_files_invalid_logs_nothing_and_says_why(image_zoo, caplog):
    folder, good, bad = image_zoo
    assert not ImageFile.LOAD_TRUNCATED_IMAGES
    dataset = UnlabeledImageDataset.from_folder(folder, TrainTransform(TEACHER, STUDENT))
    assert len(dataset) == len(good) + len(bad)

    with caplog.at_level(logging.INFO):  # PIL's own chatter is DEBUG
        for _ in range(2):  # a DataLoader worker is such a process, recreated every epoch
            samples = [dataset[i] for i in range(len(dataset))]
    # The trainer's main process reports each bad file once; the dataset itself says nothing.
    assert not caplog.records

    valid_names = {dataset.paths[s["index"]].name for s in samples if s["valid"]}
    invalid_names = {dataset.paths[s["index"]].name for s in samples if not s["valid"]}
    assert valid_names == set(good)
    assert invalid_names == set(bad)
    for sample in samples:
        assert sample["teacher_image"].shape == (3, TEACHER, TEACHER)
        assert sample["student_image"].shape == (3, STUDENT, STUDENT)
        if not sample["valid"]:
            assert not sample["teacher_image"].any() and not sample["student_image"].any()
    reasons = {dataset.paths[i].name: dataset.unreadable_reason(i) for i in range(len(dataset))}
    assert {name: reason for name, reason in reasons.items() if reason} == BAD_FILE_REASONS

    batch = next(iter(DataLoader(dataset, batch_size=len(dataset))))
    assert batch["valid"].dtype == torch.bool
    assert int((~batch["valid"]).sum()) == len(bad)
    # uint8 views from the workers, as from shards; the step's device normalises them.
    assert batch["student_image"].dtype == torch.uint8 and dataset.finishes_on_device
    finished = dataset.finish_batch(batch, torch.device("cpu"))
    large = [i for i, index in enumerate(batch["index"]) if dataset.paths[index].name == "large.jpg"][0]
    colour = _unnormalize(finished["teacher_image"][large]).mean((1, 2)) * 255  # the student's is jittered
    assert (colour - torch.tensor([90.0, 120.0, 150.0])).abs().max() < 3  # the large photo's one colour


def test_describe_unreadable_names_the_problem(tmp_path):
    contents = {
        "page.jpg": b"\n<!DOCTYPE html><html><body>404 Not Found</body></html>",
        "doc.png": b"%PDF-1.4\n%...",
        "clip.jpg": b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom",
        "half.png": _png_bytes()[:60],
        "bmp_like_text.jpg": b"BMW parts list, not a bitmap",
    }
    expected = {
        "page.jpg": "not an image (an HTML page, e.g. a download's error page)",
        "doc.png": "not an image (a PDF)",
        "clip.jpg": "not an image (ISO media of brand 'mp42', e.g. a video)",
        "half.png": "truncated PNG",
        "bmp_like_text.jpg": "not an image (text)",
    }
    for name, content in contents.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(Exception) as caught:
            load_rgb(tmp_path / name)
        assert describe_unreadable(tmp_path / name, caught.value) == expected[name], name
    missing = describe_unreadable(tmp_path / "gone.jpg", FileNotFoundError("gone"))
    assert missing.startswith("cannot be read (FileNotFoundError:") and "\n" not in missing


def test_first_readable_returns_the_first_good_file_and_why_the_others_failed(image_zoo):
    _, good, bad = image_zoo
    order = [bad["empty.jpg"], bad["truncated.jpg"], good["gray.png"], bad["text.jpg"]]
    assert first_readable(order) == (good["gray.png"], [(bad["empty.jpg"], "empty file"),
                                                        (bad["truncated.jpg"], "truncated JPEG")])
    none, failures = first_readable(map(str, bad.values()), max_side=64)
    assert none is None and [(path.name, reason) for path, reason in failures] == list(BAD_FILE_REASONS.items())
    assert first_readable([]) == (None, [])


# --- HEIC/HEIF -----------------------------------------------------------------------------------

# The start of a HEIC file: an ISO-BMFF `ftyp` box, major brand "heic", compatible "mif1" and "heic".
HEIC_FTYP = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic"


@pytest.fixture(scope="module")
def heic_bytes() -> bytes:
    """A 40x20 HEIC with a red marker in its top-left corner and EXIF orientation 6, encoded by
    pillow-heif (some builds of it can only decode: then the tests that need a real file skip)."""
    pillow_heif = pytest.importorskip("pillow_heif")
    if not pillow_heif.libheif_info().get("HEIF"):
        pytest.skip("this pillow-heif build has no HEVC encoder")
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    image.paste((255, 0, 0), (0, 0, 8, 8))
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    image.save(buffer, "HEIF", exif=exif, quality=90)
    assert buffer.getvalue()[4:12] == b"ftypheic"
    return buffer.getvalue()


@pytest.mark.parametrize("name", ["IMG_0001.HEIC", "photo.heif", "renamed.jpg"])
def test_load_rgb_reads_heic_whatever_its_name(tmp_path, heic_bytes, name):
    (tmp_path / name).write_bytes(heic_bytes)
    assert list_images(tmp_path) == [tmp_path / name]
    image = load_rgb(tmp_path / name)
    assert image.mode == "RGB"
    # HEIF keeps orientation in its own transform boxes (this file has none), which the decoder
    # applies; pillow-heif then resets the EXIF tag, so exif_transpose must not rotate it again.
    assert image.size == (40, 20)
    pixels = np.asarray(image).astype(int)
    assert pixels[2, 2, 0] > 200 and pixels[2, 2, 1] < 60 and pixels[2, 37, 0] < 60
    assert load_rgb(tmp_path / name, max_side=10).size == (10, 5)


def test_describe_unreadable_heic_with_a_jpg_name(tmp_path, monkeypatch):
    damaged = tmp_path / "IMG_0001.jpg"
    damaged.write_bytes(HEIC_FTYP + bytes(200))
    with pytest.raises(Exception) as caught:
        load_rgb(damaged)
    assert describe_unreadable(damaged, caught.value).startswith("a HEIC photo with a .jpg name, corrupt (")
    # Without pillow-heif's opener PIL cannot even identify the file: the reason says what to install.
    monkeypatch.setattr(Image, "ID", [name for name in Image.ID if name != "HEIF"])
    for path in (damaged, tmp_path / "IMG_0002.HEIC"):
        path.write_bytes(HEIC_FTYP + bytes(200))
        with pytest.raises(UnidentifiedImageError) as caught:
            load_rgb(path)
        what = "a HEIC photo with a .jpg name" if path.suffix == ".jpg" else "a HEIC photo"
        assert describe_unreadable(path, caught.value) == \
            f"{what}; pillow-heif is needed to read it (pip install pillow-heif)"


def test_images_module_imports_without_pillow_heif(monkeypatch):
    monkeypatch.setitem(sys.modules, "pillow_heif", None)  # makes `import pillow_heif` fail
    spec = importlib.util.spec_from_file_location("images_without_heif", images_module.__file__)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # a fresh copy of data/images.py, not the real one
    spec.loader.exec_module(module)
    assert module.pillow_heif is None and ".heic" in module.IMAGE_EXTENSIONS


# --- split_train_val ---------------------------------------------------------------------------


def test_split_train_val_deterministic_disjoint_complete():
    paths = [Path(f"img_{i:03d}.jpg") for i in range(50)]
    train, val = split_train_val(paths, 0.2, seed=7)
    assert (train, val) == split_train_val(list(reversed(paths)), 0.2, seed=7)
    assert len(val) == 10
    assert train == sorted(train) and val == sorted(val)
    assert not set(train) & set(val)
    assert sorted(train + val) == paths
    assert split_train_val(paths, 0.2, seed=8)[1] != val


def test_split_train_val_edge_cases():
    two = [Path("a.jpg"), Path("b.jpg")]
    assert len(split_train_val(two, 0.01, seed=0)[1]) == 1  # at least one val image
    assert len(split_train_val(two, 0.9, seed=0)[0]) == 1  # never an empty train set
    assert split_train_val(two, 0.0, seed=0) == (two, [])
    with pytest.raises(ValueError):
        split_train_val(two, 1.0, seed=0)


def test_split_train_val_ignores_global_rng():
    paths = [Path(f"{i}.jpg") for i in range(20)]
    torch.manual_seed(0)
    np.random.seed(0)
    first = split_train_val(paths, 0.3, seed=1)
    torch.manual_seed(123)
    np.random.seed(123)
    assert split_train_val(paths, 0.3, seed=1) == first


# --- transforms --------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [TrainTransform, EvalTransform])
def test_transform_size_validation(make):
    with pytest.raises(ValueError, match=r"teacher_size=520 .*14.*518 or 532"):
        make(520, 256)
    with pytest.raises(ValueError, match=r"student_size=250 .*32.*224 or 256"):
        make(518, 250)
    transform = make(518, 256)
    assert (transform.teacher_size, transform.student_size) == (518, 256)


@pytest.mark.parametrize("size", [(1, 1), (7, 3), (300, 200)])
def test_transform_output_shapes(size):
    """Training views are uint8 from a uint8 tensor (normalised on the device); evaluation's are
    normalised float32 from a PIL image."""
    image = Image.new("RGB", size, (120, 60, 30))
    for transform, source, dtype in ((TrainTransform(TEACHER, STUDENT), _tensor(image), torch.uint8),
                                     (EvalTransform(TEACHER, STUDENT), image, torch.float32)):
        out = transform(source)
        assert set(out) == {"teacher_image", "student_image"}
        assert out["teacher_image"].shape == (3, TEACHER, TEACHER)
        assert out["student_image"].shape == (3, STUDENT, STUDENT)
        assert out["teacher_image"].dtype == out["student_image"].dtype == dtype


def test_train_views_stay_aligned_under_crop_and_flip_and_match_pils_rendering():
    """Teacher and student views show the marker at the same place under every crop and flip, and
    torch's antialiased resize renders what PIL's bilinear resize of the same box renders (the
    filter evaluation uses), up to rounding."""
    # A white square on black, left of centre so flips move it; the centre of the image lies in
    # every crop of area >= 0.5, so the marker is always at least partly visible.
    image = Image.new("RGB", (320, 240), (0, 0, 0))
    image.paste((255, 255, 255), (130, 105, 160, 135))
    transform = TrainTransform(TEACHER, STUDENT, color_jitter=0)
    flips = set()
    for seed in range(12):
        torch.manual_seed(seed)
        params = transform.sample_params(*image.size)
        out = transform.apply(_tensor(image), params, None, normalize=True)
        flips.add(params.flip)
        teacher_xy = _centroid(out["teacher_image"])
        student_xy = _centroid(out["student_image"])
        assert torch.allclose(teacher_xy, student_xy, atol=1 / STUDENT), seed
        torch.manual_seed(seed)
        assert torch.equal(transform(_tensor(image))["student_image"],
                           transform.apply(_tensor(image), params, None)["student_image"])  # same draw
        for name, size in (("teacher_image", TEACHER), ("student_image", STUDENT)):
            pil = image.resize((size, size), Image.Resampling.BILINEAR, box=params.box)
            pil = _tensor(pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if params.flip else pil)
            levels = (_unnormalize(out[name]) * 255 - pil).abs()
            assert levels.mean() < 0.5 and levels.max() <= 12, (seed, name)
    assert flips == {True, False}


def test_train_views_land_where_the_crop_says():
    image = Image.new("RGB", (320, 240), (0, 0, 0))
    image.paste((255, 255, 255), (150, 110, 170, 130))  # fully inside every crop: centre (160, 120)
    transform = TrainTransform(TEACHER, STUDENT, color_jitter=0)
    for seed in range(6):
        torch.manual_seed(seed)
        params = transform.sample_params(*image.size)
        left, upper, right, lower = params.box
        expected_x = (160 - left) / (right - left)
        expected_y = (120 - upper) / (lower - upper)
        if params.flip:
            expected_x = 1 - expected_x
        student_xy = _centroid(transform.apply(_tensor(image), params, None, normalize=True)["student_image"])
        assert torch.allclose(student_xy, torch.tensor([expected_x, expected_y]), atol=1 / STUDENT)


def test_color_jitter_touches_only_the_student():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8))
    plain = TrainTransform(TEACHER, STUDENT, color_jitter=0)
    jittered = TrainTransform(TEACHER, STUDENT, color_jitter=0.5)
    torch.manual_seed(3)
    params = plain.sample_params(*image.size)
    reference = plain.apply(_tensor(image), params, plain.sample_jitter())
    out = jittered.apply(_tensor(image), params, jittered.sample_jitter())
    assert torch.equal(out["teacher_image"], reference["teacher_image"])
    assert not torch.equal(out["student_image"], reference["student_image"])


def test_eval_transform_is_deterministic_whole_image():
    image = Image.new("RGB", (200, 100), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 100, 100))  # left half white
    transform = EvalTransform(TEACHER, STUDENT)
    torch.manual_seed(0)
    first = transform(image)
    torch.manual_seed(1)
    second = transform(image)
    for key in first:
        assert torch.equal(first[key], second[key])
    # No crop: the white half fills exactly the left half of each square view.
    for key, size in (("teacher_image", TEACHER), ("student_image", STUDENT)):
        assert torch.allclose(_centroid(first[key]), torch.tensor([0.25, 0.5]), atol=1 / size)
    black = torch.tensor([-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)])
    assert torch.allclose(first["student_image"][:, 0, -1], black, atol=1e-5)


# --- LabeledDepthDataset -----------------------------------------------------------------------


def _write_labeled_set(root: Path, height: int = 24, width: int = 32) -> None:
    (root / "images").mkdir(parents=True)
    (root / "depth").mkdir()
    for stem in ("a", "b", "c"):
        Image.new("RGB", (width // 2, height // 2), (50, 80, 110)).save(
            root / "images" / f"{stem}.png"
        )
    depth = np.full((height, width), 5.0, dtype=np.float32)  # metres
    depth[0, 0] = 0.0  # no measurement
    depth[0, 1] = 20.0  # beyond max_depth
    Image.fromarray((depth * 1000).astype(np.uint16)).save(root / "depth" / "a.png")  # millimetres
    with_nan = depth.copy()
    with_nan[0, 2] = np.nan
    np.save(root / "depth" / "b.npy", with_nan)
    np.savez(root / "depth" / "c.npz", depth=depth)


def test_labeled_dataset_formats_and_range_mask(tmp_path):
    _write_labeled_set(tmp_path)
    dataset = LabeledDepthDataset(tmp_path, EvalTransform(TEACHER, STUDENT))
    assert len(dataset) == 3
    for sample in dataset:
        assert sample["teacher_image"].shape == (3, TEACHER, TEACHER)
        assert sample["student_image"].shape == (3, STUDENT, STUDENT)
        assert sample["depth"].shape == sample["valid_mask"].shape == (1, 24, 32)  # GT resolution
        assert sample["depth"].dtype == torch.float32 and sample["valid_mask"].dtype == torch.bool
        assert sample["depth"][0, 5, 5] == pytest.approx(5.0)
        assert not sample["valid_mask"][0, 0, 0] and not sample["valid_mask"][0, 0, 1]
    assert int(dataset[1]["valid_mask"].sum()) == 24 * 32 - 3  # npy one also has a NaN
    assert int(dataset[0]["valid_mask"].sum()) == 24 * 32 - 2


def test_labeled_dataset_npz_single_unnamed_array(tmp_path):
    _write_labeled_set(tmp_path)
    (tmp_path / "depth" / "c.npz").unlink()
    np.savez(tmp_path / "depth" / "c.npz", np.full((24, 32), 2.0, dtype=np.float32))
    assert LabeledDepthDataset(tmp_path, EvalTransform(TEACHER, STUDENT))[2]["depth"].max() == 2.0


@pytest.mark.parametrize("crop", ["eigen_nyu", "garg_kitti", "eigen_kitti"])
def test_labeled_dataset_crops(tmp_path, crop):
    height, width = (480, 640) if crop == "eigen_nyu" else (375, 1242)
    root = tmp_path / "set"
    (root / "images").mkdir(parents=True)
    (root / "depth").mkdir()
    Image.new("RGB", (8, 8)).save(root / "images" / "frame.jpg")
    np.save(root / "depth" / "frame.npy", np.full((height, width), 3.0, dtype=np.float32))
    mask = LabeledDepthDataset(root, EvalTransform(TEACHER, STUDENT), crop=crop)[0]["valid_mask"][0]
    rows = mask.any(1).nonzero().flatten()
    cols = mask.any(0).nonzero().flatten()
    expected = {
        "eigen_nyu": (45, 471, 41, 601),
        "garg_kitti": (153, 371, 44, 1197),
        "eigen_kitti": (124, 342, 44, 1197),
    }[crop]
    assert (int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1) == expected
    assert int(mask.sum()) == (expected[1] - expected[0]) * (expected[3] - expected[2])
    assert crop in CROPS


def test_an_unreadable_labeled_pair_is_a_blank_invalid_sample_that_names_its_file(tmp_path):
    _write_labeled_set(tmp_path)
    (tmp_path / "depth" / "b.npy").write_bytes((tmp_path / "depth" / "b.npy").read_bytes()[:100])  # truncated
    (tmp_path / "images" / "c.png").write_bytes(b"")
    dataset = LabeledDepthDataset(tmp_path, EvalTransform(TEACHER, STUDENT))
    assert [bool(sample["valid"]) for sample in dataset] == [True, False, False]
    assert [int(sample["index"]) for sample in dataset] == [0, 1, 2]
    assert not dataset[1]["valid_mask"].any() and dataset[1]["student_image"].shape == (3, STUDENT, STUDENT)
    assert dataset.unreadable_reason(0) == ""
    assert dataset.unreadable_reason(1).startswith("its depth b.npy: ")
    assert dataset.unreadable_reason(2) == "empty file" and dataset.paths[2].name == "c.png"
    # Plain iteration ends: an index past the end is an IndexError, not one more blank sample.
    assert len(list(dataset)) == 3
    assert len(list(UnlabeledImageDataset(dataset.paths, EvalTransform(TEACHER, STUDENT)))) == 3


def test_labeled_dataset_rejects_unmatched_stems_and_unknown_crop(tmp_path):
    _write_labeled_set(tmp_path)
    Image.new("RGB", (4, 4)).save(tmp_path / "images" / "orphan.png")
    np.save(tmp_path / "depth" / "lonely.npy", np.ones((4, 4), dtype=np.float32))
    with pytest.raises(ValueError, match=r"orphan.*lonely"):
        LabeledDepthDataset(tmp_path, EvalTransform(TEACHER, STUDENT))
    with pytest.raises(ValueError, match="unknown crop"):
        LabeledDepthDataset(tmp_path, EvalTransform(TEACHER, STUDENT), crop="nyu")


# --- shipped samples ---------------------------------------------------------------------------


def test_shipped_samples_all_load():
    paths = list_images(SAMPLES)
    assert len(paths) >= 8
    dataset = UnlabeledImageDataset(paths, TrainTransform(TEACHER, STUDENT))
    assert all(bool(dataset[i]["valid"]) for i in range(len(dataset)))
    for path in paths:
        assert max(load_rgb(path).size) <= 640
