"""LiteRT (TFLite) export: the file the LiteRT interpreter runs gives PyTorch's depth, its report
says how closely, and a failed conversion leaves nothing behind and says why in one line.

Needs the `mobile` extra (litert-torch, ai-edge-litert; the dev extra includes it). Without it the
conversion test is skipped, except under `.ci/run` (DEPTH_DISTILL_REQUIRE_ALL_TESTS=1), where it fails.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from data import load_rgb
from tests.conftest import save_student_folder
from tests.warm import run_warm
from trainer.ship.export import main
from trainer.ship.predict import preprocess

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "data" / "samples"
SIZE = 64


def _litert_or_skip() -> None:
    # Looked up, not imported: litert-torch imports JAX, whose threads make the later tests' forked
    # DataLoader workers deadlock-prone, so conversions run in a process of their own (a warm one).
    missing = [name for name in ("litert_torch", "ai_edge_litert") if importlib.util.find_spec(name) is None]
    if not missing:
        return
    if os.environ.get("DEPTH_DISTILL_REQUIRE_ALL_TESTS") == "1":
        pytest.fail(f"the mobile extra is required here; missing {missing}")
    pytest.skip(f'needs pip install -e ".[mobile]"; missing {missing}')


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_student_folder(tmp_path_factory.mktemp("run") / "student_best", SIZE)


def _one_error_line(capsys) -> str:
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1].startswith("error: ") and not any(line.startswith("error") for line in error[:-1]), error
    return error[-1]


def test_tflite_file_gives_pytorch_depth_and_reports_it(checkpoint, capsys):
    _litert_or_skip()
    from ai_edge_litert.interpreter import Interpreter

    from modeling import load_student

    done = run_warm("trainer.ship.export", ["--checkpoint", str(checkpoint), "--format", "tflite"])
    assert done.returncode == 0, done.stderr
    path = checkpoint.parent / "student.tflite"
    assert done.stdout.rstrip().endswith(f"wrote {path.resolve()} and {path.resolve()}.json")
    report = json.loads(path.with_suffix(".tflite.json").read_text())
    assert report["file_mb"] == round(path.stat().st_size / 1e6, 2)
    assert report["max_abs_diff_vs_pytorch"] <= 1e-3
    fidelity = report["fidelity"]
    assert fidelity["num_images"] == len(list(SAMPLES.glob("*.jpg"))) and fidelity["aligned_delta1"] == 1.0
    assert fidelity["max_abs_diff"] <= 1e-3 and fidelity["aligned_abs_rel"] <= 1e-4
    assert report["input_layout"].startswith(f"NHWC float32 (1, {SIZE}, {SIZE}, 3)")

    # Run the file as an app would, independently of the exporter's own check.
    interpreter = Interpreter(model_path=str(path))
    assert interpreter.get_signature_list() == {"serving_default": {"inputs": ["image"], "outputs": ["disparity"]}}
    runner = interpreter.get_signature_runner()
    image = preprocess(load_rgb(SAMPLES / "phone_03.jpg"), SIZE)  # (3, H, W), ImageNet-normalised
    disparity = runner(image=image.permute(1, 2, 0)[None].numpy())["disparity"]
    assert disparity.shape == (1, SIZE, SIZE, 1)
    with torch.no_grad():
        expected = load_student(checkpoint)(image[None]).permute(0, 2, 3, 1).numpy()
    assert np.abs(disparity - expected).max() <= 1e-4

    before = path.read_bytes()
    assert main(["--checkpoint", str(checkpoint), "--format", "tflite"]) == 1
    assert _one_error_line(capsys) == (f"error: {path} already exists (and student.tflite.json); pass --overwrite "
                                       f"to replace it or choose another --output")
    assert path.read_bytes() == before
    assert "jax" not in sys.modules  # see _litert_or_skip


def test_failed_conversion_leaves_no_file_and_says_why(checkpoint, tmp_path, monkeypatch, capsys):
    def unsupported(*args, **kwargs):
        raise RuntimeError("aten::unfold is not supported\nfull trace follows")

    # A stand-in converter that fails as litert-torch does on an operator it cannot lower.
    monkeypatch.setitem(sys.modules, "litert_torch", types.SimpleNamespace(convert=unsupported, __version__="0.10.0"))
    output = tmp_path / "student.tflite"
    assert main(["--checkpoint", str(checkpoint), "--format", "tflite", "--output", str(output)]) == 1
    assert _one_error_line(capsys) == (f"error: LiteRT conversion to {output} failed: RuntimeError: aten::unfold is "
                                       f"not supported")
    assert list(tmp_path.iterdir()) == []


def test_without_the_mobile_extra_one_line_says_what_to_install(checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "litert_torch", None)  # what an install without the extra has
    output = tmp_path / "student.tflite"
    assert main(["--checkpoint", str(checkpoint), "--format", "tflite", "--output", str(output)]) == 1
    assert _one_error_line(capsys).startswith('error: the LiteRT export needs the mobile extra: pip install -e '
                                              '".[mobile]" (litert-torch and ai-edge-litert)')
    assert list(tmp_path.iterdir()) == []
    assert main(["--checkpoint", str(checkpoint), "--format", "tflite", "--output", str(tmp_path / "s.onnx")]) == 1
    assert _one_error_line(capsys) == f"error: --output {tmp_path / 's.onnx'} must end in .tflite"
