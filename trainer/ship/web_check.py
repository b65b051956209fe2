"""Checks a page written by `python -m trainer.ship.export --web DIR` in headless Chromium: each photo
goes through the page's own file picker, and the input and depth the page computed are compared
with Python's preprocessing and onnxruntime in Python.

    python -m trainer.ship.web_check runs/demo/web [photos ...] [--screenshot page.png] [--json web.json]

Needs Chromium (Debian: `apt-get install chromium`; elsewhere pass --chromium PATH) and the
`playwright` Python package (in the dev extra); Playwright drives the installed browser and
downloads nothing. Photos default to the samples the project ships.
Exit codes: 0 checked, every photo within --tolerance; 1 a mistake, or a photo outside it.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import shutil
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from data import load_rgb
from core.cli import ArgumentParser
from trainer.console import print_error
from core.errors import first_line
from trainer.ship.fidelity import agreement, sample_photos
from trainer.ship.predict import preprocess

# Flags for a machine without a display or outside network: no sandbox (root in containers), no GPU,
# no background connections to Google's services.
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run", "--disable-quic"]
# The page's input is Python's exactly, so what is left is onnxruntime-web's WebAssembly kernels
# against onnxruntime's native ones: the same fp32 graph summed in other orders, about float32's
# epsilon times the network's depth (measured: 1.2e-7 on disparities averaging 0.6). 1e-4 leaves a
# wide margin and is ten times tighter than the export's own check against PyTorch (1e-3).
TOLERANCE = 1e-4
TIMEOUT_MS = 120_000


class PageCheckError(RuntimeError):
    """The page could not be served, opened or run."""


def find_chromium(path: Optional[str] = None) -> str:
    found = path or shutil.which("chromium") or shutil.which("chromium-browser")
    if not found or not Path(found).is_file():
        raise PageCheckError("no Chromium found: install it (Debian: apt-get install chromium) or pass --chromium PATH")
    return found


@contextlib.contextmanager
def serve(folder: Path) -> Iterator[str]:
    """Serves `folder` on 127.0.0.1 (a free port) while the block runs; yields its URL."""

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def open_page(folder: Path, chromium: Optional[str] = None, viewport: tuple[int, int] = (1100, 720)):
    """The page in `folder`, served and opened in headless Chromium, its model loaded. Yields the
    Playwright page; the files it failed to get are checked when the block ends."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as error:
        raise PageCheckError(f'the page check needs playwright: pip install -e ".[dev]" '
                             f'({first_line(error)})') from error
    executable = find_chromium(chromium)
    with serve(folder) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
            failed = []
            page.on("requestfailed", lambda request: failed.append(request.url))
            page.on("response", lambda response: failed.append(response.url) if response.status >= 400 else None)
            page.goto(url)
            page.wait_for_function("document.body.dataset.state !== 'loading'", timeout=TIMEOUT_MS)
            if page.evaluate("document.body.dataset.state") != "ready":
                raise PageCheckError(f"the page in {folder} did not load: {page.inner_text('#status')}")
            yield page
            if failed:
                raise PageCheckError(f"the page asked for files it could not get: {', '.join(failed)}")
        finally:
            browser.close()


def run_photo(page, path: Path) -> dict:
    """Feeds `path` to the page's file picker; returns what the page computed: the photo's size,
    the model's input (1, 3, S, S) and disparity (1, 1, S, S) as float32 arrays, the model's time."""
    page.set_input_files("#picker", str(path))
    page.wait_for_function("['done', 'error'].includes(document.body.dataset.state)", timeout=TIMEOUT_MS)
    if page.evaluate("document.body.dataset.state") != "done":
        raise PageCheckError(page.inner_text("#status"))
    result = page.evaluate("""(() => { const last = window.depthDistill.last;
        return {width: last.width, height: last.height, size: last.size, model_ms: last.modelMs,
                input: Array.from(last.input), disparity: Array.from(last.disparity)}; })()""")
    size = result["size"]
    result["input"] = np.asarray(result["input"], dtype=np.float32).reshape(1, 3, size, size)
    result["disparity"] = np.asarray(result["disparity"], dtype=np.float32).reshape(1, 1, size, size)
    return result


def compare_photo(page, session, path: Path) -> dict:
    """The page against Python on one photo: is the input identical, and how far is the page's
    depth from onnxruntime's on Python's input (`trainer.ship.fidelity.agreement`)."""
    result = run_photo(page, path)
    photo = load_rgb(path)
    expected_input = preprocess(photo, result["size"])[None].numpy()
    reference = session.run(["disparity"], {"image": expected_input})[0]
    return {"photo": path.name, "size": [result["width"], result["height"]],
            "same_size_as_python": (result["width"], result["height"]) == photo.size,
            "input_max_abs_diff": float(np.abs(result["input"] - expected_input).max()),
            **agreement(torch.from_numpy(result["disparity"]), torch.from_numpy(reference)),
            "model_ms": round(result["model_ms"], 1)}


def check_page(folder: Path, photos: Optional[Sequence[Path]] = None, chromium: Optional[str] = None,
               screenshot: Optional[Path] = None) -> dict:
    """Every photo through the page in `folder`; returns the per-photo figures and their worst case."""
    import onnxruntime

    folder = Path(folder)
    if not (folder / "student.onnx").is_file() or not (folder / "index.html").is_file():
        raise PageCheckError(f"{folder} holds no page: write one with python -m trainer.ship.export --web {folder}")
    session = onnxruntime.InferenceSession(str(folder / "student.onnx"), providers=["CPUExecutionProvider"])
    with open_page(folder, chromium) as page:
        rows = [compare_photo(page, session, Path(path)) for path in (photos or sample_photos())]
        if screenshot:
            page.screenshot(path=str(screenshot))
    worst = {key: max(row[key] for row in rows) for key in ("input_max_abs_diff", "max_abs_diff", "aligned_abs_rel")}
    worst["aligned_delta1"] = min(row["aligned_delta1"] for row in rows)
    return {"page": str(folder), "photos": rows, "worst": worst,
            "model_ms_median": float(np.median([row["model_ms"] for row in rows]))}


def main(argv: Optional[list[str]] = None) -> int:
    parser = ArgumentParser(prog="python -m trainer.ship.web_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("page", type=Path, help="a folder written by python -m trainer.ship.export --web")
    parser.add_argument("photos", nargs="*", type=Path, help="photos to feed it; default: the shipped samples")
    parser.add_argument("--chromium", help="the Chromium executable; default: chromium on the PATH")
    parser.add_argument("--screenshot", type=Path, help="save a screenshot of the page after the last photo")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE,
                        help=f"largest disparity difference and aligned abs_rel allowed (default {TOLERANCE})")
    args = parser.parse_args(argv)
    try:
        report = check_page(args.page, args.photos, args.chromium, args.screenshot)
    except PageCheckError as error:
        print_error(str(error))
        return 1
    except Exception as error:  # Playwright's own errors: a browser that would not start, a timeout
        if not type(error).__module__.startswith("playwright"):
            raise
        print_error(f"the browser failed: {first_line(error)}")
        return 1
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    worst = report["worst"]
    print(f"{len(report['photos'])} photos: input max |page - python| = {worst['input_max_abs_diff']:.3g}, "
          f"depth max |page - onnxruntime| = {worst['max_abs_diff']:.3g}, aligned abs_rel = "
          f"{worst['aligned_abs_rel']:.3g}, model {report['model_ms_median']:.1f} ms (median)")
    if max(worst["max_abs_diff"], worst["aligned_abs_rel"]) > args.tolerance:
        print_error(f"the page's depth differs from onnxruntime's by more than --tolerance {args.tolerance}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
