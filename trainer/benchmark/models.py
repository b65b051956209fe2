"""The models a benchmark compares, each as (how to turn a photo into its input, how to run it).

A `--model` is a student folder (config.json + model.safetensors), an ONNX file, or a teacher:
`teacher:small` (or base, large, tiny, any hub id or folder after `teacher:`), a Depth Anything
folder saved with save_pretrained, or a hub id such as depth-anything/Depth-Anything-V2-Small-hf.

Each model sees the photo the way it is deployed: a student (PyTorch or ONNX) the whole photo
resized to its square input, exactly as `trainer.ship.predict`; a teacher Depth Anything V2's own
preprocessing, transformers' DPTImageProcessor as the released checkpoints configure it (shorter
side to 518, aspect kept, sides multiples of 14, bicubic). Everything runs in float32.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from PIL import Image

from core.normalization import IMAGENET_MEAN, IMAGENET_STD
from trainer.console import say

TEACHER_PREFIX = "teacher:"
TEACHER_SIZE = 518  # Depth Anything V2's inference size
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


@dataclass
class BenchmarkModel:
    name: str  # as the user gave it; the table's row label
    is_teacher: bool
    prepare: Callable[[Image.Image], torch.Tensor]  # photo -> (3, h, w) input; runs in DataLoader workers
    predict: Callable[[torch.Tensor], torch.Tensor]  # (1, 3, h, w) -> (1, 1, h, w) disparity
    input_note: str  # what the model is fed, for the report


def _teacher_input(processor, image: Image.Image) -> torch.Tensor:
    return processor(images=image, return_tensors="pt")["pixel_values"][0]


def _load_teacher(name: str, source: str, device: torch.device, size: int) -> BenchmarkModel:
    from transformers import DPTImageProcessor

    from modeling import DepthAnythingTeacher

    teacher = DepthAnythingTeacher.from_pretrained(source).float().to(device)
    # The preprocessor_config.json of the Depth-Anything-V2-*-hf checkpoints, with the size settable.
    processor = DPTImageProcessor(do_resize=True, size={"height": size, "width": size}, keep_aspect_ratio=True,
                                  ensure_multiple_of=14, resample=Image.Resampling.BICUBIC, do_rescale=True,
                                  rescale_factor=1 / 255, do_normalize=True, image_mean=list(IMAGENET_MEAN),
                                  image_std=list(IMAGENET_STD), do_pad=False)

    @torch.no_grad()
    def predict(images: torch.Tensor) -> torch.Tensor:
        return teacher(images.to(device)).disparity.float()

    return BenchmarkModel(name, True, partial(_teacher_input, processor), predict,
                          f"shorter side {size}, aspect kept, multiples of 14, bicubic")


def _load_student(name: str, path: Path, device: torch.device) -> BenchmarkModel:
    from trainer.ship.predict import load_model, preprocess

    loaded = load_model(path)  # a student folder or an ONNX file, at its own size; ValueError if not
    if loaded.size_note:
        say(f"note: {loaded.size_note}")

    def predict(images: torch.Tensor) -> torch.Tensor:
        return loaded.predict(images).to(device)

    return BenchmarkModel(name, False, partial(preprocess, size=loaded.size), predict,
                          f"whole photo resized to {loaded.size}x{loaded.size}, bilinear")


def _is_depth_anything_folder(folder: Path) -> bool:
    try:
        return json.loads((folder / "config.json").read_text()).get("model_type") == "depth_anything"
    except (OSError, ValueError, AttributeError):
        return False


def load_benchmark_model(spec: str, device: torch.device, teacher_size: int = TEACHER_SIZE) -> BenchmarkModel:
    """The model `spec` names. Raises ValueError, StudentLoadError or TeacherLoadError (one line)."""
    if spec.startswith(TEACHER_PREFIX):
        return _load_teacher(spec, spec[len(TEACHER_PREFIX):], device, teacher_size)
    path = Path(spec).expanduser()
    if path.suffix == ".onnx" or (path.is_dir() and not _is_depth_anything_folder(path)):
        return _load_student(spec, path, device)
    # A hub id looks like owner/name; "runs/student" whose runs/ exists is a mistyped folder instead.
    looks_like_hub_id = _HUB_ID.fullmatch(spec) and not Path(spec.split("/")[0]).exists()
    if path.is_dir() or (not path.exists() and looks_like_hub_id):
        return _load_teacher(spec, spec, device, teacher_size)
    raise ValueError(f"--model {spec}: no such student folder or .onnx file; give a student folder, an ONNX file, "
                     f"teacher:small (or another teacher name, hub id or folder after 'teacher:')")
