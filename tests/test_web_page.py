"""The browser page (`python -m trainer.ship.export --web DIR`): written only where it may be, and in
headless Chromium it prepares a photo exactly as Python does and gives onnxruntime's depth.

The browser tests (through `trainer.ship.web_check`) need Debian's `chromium`, the `playwright`
Python package (dev extra) and onnxruntime-web (`npm ci --prefix web`). Where one is missing they
are skipped, except under `.ci/run`, which installs all three and sets
DEPTH_DISTILL_REQUIRE_ALL_TESTS=1 so that they fail instead.
The screenshot is kept in $DEPTH_DISTILL_ARTIFACTS (default: test-artifacts/ in the repository).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
from PIL import Image

from data import load_rgb
from tests.conftest import save_student_folder
from tests.warm import run_warm
from trainer.ship import web, web_check
from trainer.ship.export import ExportError, main
from trainer.ship.predict import preprocess

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "data" / "samples"
ARTIFACTS = Path(os.environ.get("DEPTH_DISTILL_ARTIFACTS", REPO / "test-artifacts"))
SIZE = 128  # the tiny student's export size: a multiple of 64, so the file takes any multiple of 64


def _browser_problem() -> str | None:
    try:
        web_check.find_chromium(os.environ.get("DEPTH_DISTILL_CHROMIUM"))
        import playwright.sync_api  # noqa: F401
    except (web_check.PageCheckError, ImportError) as error:
        return f"{error} (bash tests/install_browser.sh; also pip install -e '.[dev]' for playwright)"
    problem = web.runtime_problem(web.DEFAULT_RUNTIME)
    return problem and f"{problem} (bash tests/install_browser.sh)"


def _missing_or_skip(problem: str | None) -> None:
    if problem is None:
        return
    if os.environ.get("DEPTH_DISTILL_REQUIRE_ALL_TESTS") == "1":
        pytest.fail(f"{problem} (required: DEPTH_DISTILL_REQUIRE_ALL_TESTS=1)")
    pytest.skip(problem)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_student_folder(tmp_path_factory.mktemp("run") / "student_best", SIZE)


@pytest.fixture(scope="module")
def browser_page(checkpoint, tmp_path_factory):
    """The page exported through the CLI, served on 127.0.0.1 and opened in headless Chromium,
    its model loaded; every file it asks for must be in its folder (it works offline). The tests
    that use it share one pytest-xdist worker (ON_THE_PAGE), which opens it once."""
    _missing_or_skip(_browser_problem())
    page_dir = tmp_path_factory.mktemp("served") / "web"
    assert main(["--checkpoint", str(checkpoint), "--web", str(page_dir)]) == 0
    with web_check.open_page(page_dir, os.environ.get("DEPTH_DISTILL_CHROMIUM")) as page:
        yield page, page_dir


ON_THE_PAGE = pytest.mark.xdist_group("browser_page")


def _page_preprocess(page, image: Image.Image, size: int) -> np.ndarray:
    """The page's own resize and normalisation (depth.js) run on pixels decoded by Pillow."""
    rgba = np.asarray(image.convert("RGBA"))
    values = page.evaluate(
        """([pixels, width, height, size, mean, std]) =>
            Array.from(normalize(resizeLikePillow(Uint8Array.from(pixels), width, height, size), size, mean, std))""",
        [rgba.ravel().tolist(), image.width, image.height, size, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]])
    return np.asarray(values, dtype=np.float32).reshape(3, size, size)


@ON_THE_PAGE
def test_page_resizes_and_normalises_exactly_like_python(browser_page):
    page, _ = browser_page
    rng = np.random.default_rng(0)
    cases = [Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
             for width, height in [(300, 200), (97, 61), (128, 300), (300, 128), (128, 128)]]  # down, up, one axis
    cases.append(load_rgb(SAMPLES / "chelsea.jpg"))
    for image in cases:
        expected = preprocess(image, SIZE).numpy()
        got = _page_preprocess(page, image, SIZE)
        assert np.array_equal(got, expected), (image.size, float(np.abs(got - expected).max()))
    # Another size: the page takes it from the model's report, nothing is fixed to SIZE.
    assert np.array_equal(_page_preprocess(page, cases[-1], 64), preprocess(cases[-1], 64).numpy())


@ON_THE_PAGE
def test_page_gives_the_depth_of_onnxruntime_in_python(browser_page, tmp_path):
    page, page_dir = browser_page
    session = onnxruntime.InferenceSession(str(page_dir / "student.onnx"), providers=["CPUExecutionProvider"])
    rotated = tmp_path / "rotated.jpg"  # EXIF orientation 6: stored sideways, shown upright
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.open(SAMPLES / "phone_02.jpg").save(rotated, quality=92, exif=exif)
    rows = [web_check.compare_photo(page, session, path) for path in [rotated, SAMPLES / "phone_01.jpg"]]
    for row in rows:
        assert row["same_size_as_python"], row  # the EXIF orientation applied, as load_rgb does
        # The browser's JPEG decoder gives Pillow's pixels here, so the input is identical.
        assert row["input_max_abs_diff"] == 0.0, row
        assert row["max_abs_diff"] <= web_check.TOLERANCE and row["aligned_abs_rel"] <= web_check.TOLERANCE, row
    assert rows[0]["size"] == [640, 531] and "ms" in page.inner_text("#status")

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web_page.png"))  # after phone_01.jpg
    (ARTIFACTS / "web_page.json").write_text(json.dumps(rows, indent=2) + "\n")
    # Photo and depth side by side, the same size, the depth map not blank.
    photo_box, depth_box = (page.locator(f"#{name}").bounding_box() for name in ("photo", "depth"))
    assert depth_box["x"] >= photo_box["x"] + photo_box["width"] and depth_box["y"] == photo_box["y"]
    assert (depth_box["width"], depth_box["height"]) == (photo_box["width"], photo_box["height"])
    shown = page.evaluate("""(() => { const c = document.getElementById('depth');
        return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data); })()""")
    assert len(set(shown[0::4])) > 10  # many shades of red: a colour map, not an empty canvas


@ON_THE_PAGE
def test_web_check_cli_reports_the_page_against_python(browser_page, tmp_path, capsys):
    _, page_dir = browser_page
    output = tmp_path / "web.json"
    chromium = ["--chromium", os.environ["DEPTH_DISTILL_CHROMIUM"]] if "DEPTH_DISTILL_CHROMIUM" in os.environ else []
    # Its own (warm) process: one Playwright session per process, and the fixture's is open.
    done = run_warm("trainer.ship.web_check", [str(page_dir), str(SAMPLES / "coffee.jpg"), "--json", str(output),
                                               *chromium])
    assert done.returncode == 0, done.stderr
    summary = done.stdout.rstrip().splitlines()[-1]
    assert summary.startswith("1 photos: input max |page - python| = 0, depth max |page - onnxruntime| = ")
    report = json.loads(output.read_text())
    assert [row["photo"] for row in report["photos"]] == ["coffee.jpg"]
    assert report["worst"]["max_abs_diff"] <= web_check.TOLERANCE
    assert web_check.main([str(tmp_path)]) == 1
    assert _one_error_line(capsys) == (f"error: {tmp_path} holds no page: write one with python -m "
                                       f"trainer.ship.export --web {tmp_path}")


@ON_THE_PAGE
def test_page_says_when_a_file_is_not_a_photo(browser_page, tmp_path):
    page, _ = browser_page
    notes = tmp_path / "notes.txt"
    notes.write_text("not a photo")
    page.set_input_files("#picker", str(notes))
    page.wait_for_function("['done', 'error'].includes(document.body.dataset.state)", timeout=60_000)
    assert page.evaluate("document.body.dataset.state") == "error"
    assert page.inner_text("#status").startswith("could not run on notes.txt: ")
    assert page.inner_text("#status").endswith("(is it an image file?)")


# Without a browser: where the page may be written, and what a failure leaves.

def _one_error_line(capsys) -> str:
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "\n" not in error, error
    return error


@pytest.fixture
def fake_runtime(tmp_path) -> Path:
    """A stand-in onnxruntime-web package: the files the page copies, a few bytes each."""
    package = tmp_path / "onnxruntime-web"
    (package / "dist").mkdir(parents=True)
    for name in web.RUNTIME_FILES:
        (package / "dist" / name).write_text(f"// {name}")
    (package / "package.json").write_text(json.dumps({"version": "1.0.0-test", "license": "MIT"}))
    return package


def test_web_export_writes_a_self_contained_page(checkpoint, tmp_path, fake_runtime, capsys):
    page_dir = tmp_path / "page"
    assert main(["--checkpoint", str(checkpoint), "--web", str(page_dir), "--onnxruntime-web", str(fake_runtime)]) == 0
    assert capsys.readouterr().out.rstrip().endswith(
        f"serve it with: python -m http.server -d {page_dir} 8000, then open http://127.0.0.1:8000")
    marker = json.loads((page_dir / web.MARKER).read_text())
    assert sorted(path.name for path in page_dir.iterdir()) == sorted(marker["files"]) == sorted(
        [*web.PAGE_FILES, *web.RUNTIME_FILES, "student.onnx", "student.onnx.json", "colormap.json", web.MARKER])
    assert marker["onnxruntime_web"] == "1.0.0-test" and marker["onnx"]["export_size"] == [SIZE, SIZE]
    # What the page reads: the size, normalisation and names from the model's report, and its colours.
    report = json.loads((page_dir / "student.onnx.json").read_text())
    assert (report["input"], report["output"], report["mean"]) == ("image", "disparity", [0.485, 0.456, 0.406])
    lut = json.loads((page_dir / "colormap.json").read_text())["lut"]
    assert len(lut) == 256 and lut[-1][0] > lut[-1][2] and lut[0][2] > lut[0][0]  # near red, far blue
    html = (page_dir / "index.html").read_text()
    assert not re.search(r"https?://", html + (page_dir / "depth.js").read_text())  # nothing from another site
    assert [line for line in html.splitlines() if "<script src=" in line] == [
        '<script src="ort.wasm.min.js"></script>', '<script src="depth.js"></script>']


def test_web_export_refuses_folders_it_did_not_write(checkpoint, tmp_path, fake_runtime, capsys):
    args = ["--checkpoint", str(checkpoint), "--onnxruntime-web", str(fake_runtime)]
    theirs = tmp_path / "site"
    theirs.mkdir()
    (theirs / "index.html").write_text("their page")
    assert main([*args, "--web", str(theirs)]) == 1
    assert _one_error_line(capsys) == (f"error: --web {theirs} holds files this tool did not write (e.g. index.html); "
                                       f"choose a new or empty folder")
    assert main([*args, "--web", str(theirs), "--overwrite"]) == 1  # --overwrite is for its own pages only
    capsys.readouterr()
    assert [path.name for path in theirs.iterdir()] == ["index.html"]
    assert (theirs / "index.html").read_text() == "their page"

    ours = tmp_path / "ours"
    assert main([*args, "--web", str(ours)]) == 0
    capsys.readouterr()
    assert main([*args, "--web", str(ours)]) == 1
    assert _one_error_line(capsys) == (f"error: --web {ours} already holds a page; pass --overwrite to replace it "
                                       f"or choose another --web")
    (ours / "student.onnx").write_bytes(b"stale")
    assert main([*args, "--web", str(ours), "--overwrite"]) == 0
    assert (ours / "student.onnx").read_bytes() != b"stale"

    for extra, expected in [(["--format", "tflite"], "--web writes its own student.onnx into DIR; drop --format "
                                                     "tflite and --output"),
                            (["--onnxruntime-web", str(tmp_path)], f"--onnxruntime-web {tmp_path} lacks "
                                                                   f"dist/ort.wasm.min.js; give the onnxruntime-web "
                                                                   f"npm package's folder")]:
        assert main([*args, "--web", str(tmp_path / "new"), *extra]) == 1
        assert _one_error_line(capsys) == f"error: {expected}"
    assert not (tmp_path / "new").exists()


def test_web_export_without_the_npm_package_says_how_to_install_it(checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(web, "DEFAULT_RUNTIME", tmp_path / "node_modules" / "onnxruntime-web")
    monkeypatch.setattr(web, "NPM_PREFIX", tmp_path)
    assert main(["--checkpoint", str(checkpoint), "--web", str(tmp_path / "page")]) == 1
    assert _one_error_line(capsys) == (f"error: onnxruntime-web is not installed in {tmp_path}: run `npm ci --prefix "
                                       f"{tmp_path}` (Node.js 18 or newer), or pass --onnxruntime-web PACKAGE_DIR")
    assert sorted(path.name for path in tmp_path.iterdir()) == []


def test_failed_web_export_leaves_the_previous_page_as_it_was(checkpoint, tmp_path, fake_runtime, monkeypatch,
                                                              capsys):
    page_dir = tmp_path / "page"
    args = ["--checkpoint", str(checkpoint), "--web", str(page_dir), "--onnxruntime-web", str(fake_runtime)]
    assert main(args) == 0
    before = {path.name: path.read_bytes() for path in page_dir.iterdir()}

    def failing_export(*args, **kwargs):
        raise ExportError("ONNX output differs from PyTorch by nan at 128x128 (> export.atol=0.001)")

    monkeypatch.setattr(web, "export_student", failing_export)
    assert main([*args, "--overwrite"]) == 1
    assert _one_error_line(capsys) == "error: ONNX output differs from PyTorch by nan at 128x128 (> export.atol=0.001)"
    assert {path.name: path.read_bytes() for path in page_dir.iterdir()} == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["onnxruntime-web", "page"]  # no staging folder left
