"""A self-contained web page that runs the student in the browser with onnxruntime-web.

    python -m trainer.ship.export --checkpoint runs/demo/student_best --web runs/demo/web
    python -m http.server -d runs/demo/web 8000      # then open http://127.0.0.1:8000

The folder holds the checked ONNX student (`student.onnx` and its report), onnxruntime-web's
WebAssembly build (copied from the npm package the project installs: `npm ci --prefix web`), the
page (`index.html`, `depth.js`) and the colour map. Nothing is fetched from the network: any static
server works offline. The page prepares a photo exactly as `trainer.ship.predict` does (see
`web_page/depth.js`); `tests/test_web_page.py` checks that in headless Chromium.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

from torch import nn

from core.errors import first_line
from trainer.ship.export import ExportError, export_student

PAGE_SOURCES = Path(__file__).resolve().parent / "web_page"
PAGE_FILES = ("index.html", "depth.js")
# The npm package's files the page loads: the WebAssembly-only build (no WebGPU/WebGL code) and its
# SIMD module, which runs single-threaded unless the server sends cross-origin isolation headers.
RUNTIME_FILES = ("ort.wasm.min.js", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
# The project's own npm install (web/package.json, locked in web/package-lock.json).
NPM_PREFIX = Path(__file__).resolve().parents[2] / "web"
DEFAULT_RUNTIME = NPM_PREFIX / "node_modules" / "onnxruntime-web"
MARKER = "depth-distill-web.json"  # written last; says the folder is a page this tool made
COLORMAP = "Spectral_r"  # trainer.ship.predict's default: near red, far blue


def runtime_problem(package: Path) -> Optional[str]:
    """Why onnxruntime-web cannot be taken from `package` (the npm package's folder), or None."""
    missing = [name for name in RUNTIME_FILES if not (package / "dist" / name).is_file()]
    if not missing:
        return None
    if package == DEFAULT_RUNTIME:
        return (f"onnxruntime-web is not installed in {NPM_PREFIX}: run `npm ci --prefix {NPM_PREFIX}` "
                f"(Node.js 18 or newer), or pass --onnxruntime-web PACKAGE_DIR")
    return f"--onnxruntime-web {package} lacks dist/{missing[0]}; give the onnxruntime-web npm package's folder"


def web_dir_problem(out_dir: Path, overwrite: bool) -> Optional[str]:
    """Why the page must not be written into `out_dir`, or None. A new or empty folder is fine; a
    page this tool wrote is replaced with --overwrite; a folder with anyone else's files is refused."""
    if out_dir.exists() and not out_dir.is_dir():
        return f"--web {out_dir} is a file; give a folder (new or empty)"
    if not out_dir.parent.is_dir():
        return f"folder {out_dir.parent} for --web does not exist; create it or choose another --web"
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return None
    if not (out_dir / MARKER).is_file():
        example = sorted(path.name for path in out_dir.iterdir())[0]
        return (f"--web {out_dir} holds files this tool did not write (e.g. {example}); "
                f"choose a new or empty folder")
    if not overwrite:
        return f"--web {out_dir} already holds a page; pass --overwrite to replace it or choose another --web"
    return None


def colormap_lut(name: str = COLORMAP) -> list[list[int]]:
    """256 RGB entries, as `trainer.ship.predict` writes the colours of its depth maps."""
    from trainer.evaluate.visualize import lut

    return (lut(name) * 255).round().int().tolist()


def _package_field(package: Path, field: str) -> str:
    try:
        return json.loads((package / "package.json").read_text())[field]
    except (OSError, ValueError, KeyError):
        return "unknown"


def write_web_page(student: nn.Module, out_dir: Path, size: int, opset: int = 18, atol: float = 1e-3,
                   runtime: Path = DEFAULT_RUNTIME) -> dict:
    """Export `student` (checked as `export_student` does) and write the page into `out_dir`.

    Everything is built in a temporary folder beside `out_dir` and moved in at the end, so a failure
    (raised as ExportError) leaves `out_dir` as it was. The caller checks `web_dir_problem` first."""
    out_dir = Path(out_dir)
    problem = runtime_problem(runtime)
    if problem:
        raise ExportError(problem)
    staging = out_dir.parent / f".tmp_{out_dir.name}_{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)  # our own leftover from a killed run
    try:
        staging.mkdir()
        report = export_student(student, staging / "student.onnx", size, opset, atol)
        for name in PAGE_FILES:
            shutil.copyfile(PAGE_SOURCES / name, staging / name)
        for name in RUNTIME_FILES:
            shutil.copyfile(runtime / "dist" / name, staging / name)
        (staging / "colormap.json").write_text(json.dumps({"name": COLORMAP, "lut": colormap_lut()}) + "\n")
        files = sorted(path.name for path in staging.iterdir()) + [MARKER]
        page = {
            "page": "index.html", "files": files, "onnxruntime_web": _package_field(runtime, "version"),
            "onnxruntime_web_license": _package_field(runtime, "license"),
            "size_mb": round(sum(path.stat().st_size for path in staging.iterdir()) / 1e6, 2),
            "serve": f"python -m http.server -d {out_dir} 8000, then open http://127.0.0.1:8000",
            "onnx": report,
        }
        (staging / MARKER).write_text(json.dumps(page, indent=2) + "\n")
        if out_dir.is_dir():
            for name in files:
                os.replace(staging / name, out_dir / name)
        else:
            os.rename(staging, out_dir)
    except ExportError:
        raise
    except OSError as error:
        raise ExportError(f"could not write the page into {out_dir}: {first_line(error)}") from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return page
