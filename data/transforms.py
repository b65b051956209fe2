"""Turn one RGB photo into the aligned teacher and student input tensors."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop, v2
from torchvision.transforms.v2 import functional as F

from core.choices import STUDENT_MULTIPLE, TEACHER_MULTIPLE, check_multiple
from core.normalization import IMAGENET_MEAN, IMAGENET_STD


class CropParams(NamedTuple):
    """One draw of the geometric augmentation, shared by both views."""

    box: tuple[int, int, int, int]  # (left, upper, right, lower) in source pixels, PIL's order
    flip: bool


class TrainTransform:
    """One random crop + flip rendered at both input sizes; colour jitter on the student only.

    Teacher and student see the same region, so their outputs stay pixel-aligned for the
    distillation losses; only the student gets photometric noise, so it learns to match the
    teacher's clean prediction. Randomness comes from torch's global RNG, which the DataLoader
    seeds per worker.
    """

    def __init__(
        self,
        teacher_size: int,
        student_size: int,
        scale: tuple[float, float] = (0.5, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip_prob: float = 0.5,
        color_jitter: float = 0.2,
    ) -> None:
        check_input_sizes(teacher_size, student_size)
        self.teacher_size = teacher_size
        self.student_size = student_size
        self.scale = scale
        self.ratio = ratio
        self.hflip_prob = hflip_prob
        self.color_jitter = (
            v2.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter)
            if color_jitter > 0
            else None
        )

    def sample_params(self, image: Image.Image) -> CropParams:
        return self.sample_params_for_size(image.width, image.height)

    def sample_params_for_size(self, width: int, height: int) -> CropParams:
        # get_params reads only the image's size: a zero-stride tensor of that shape allocates nothing.
        like = torch.empty(()).expand(1, height, width)
        top, left, crop_height, crop_width = RandomResizedCrop.get_params(like, list(self.scale), list(self.ratio))
        flip = bool(torch.rand(()) < self.hflip_prob)
        return CropParams(box=(left, top, left + crop_width, top + crop_height), flip=flip)

    def sample_jitter(self) -> Optional[dict]:
        """One draw of the student's colour jitter (ColorJitter's own parameters), or None. Drawn
        right after the crop, as the PIL path's jitter draws, so both paths consume the RNG alike."""
        return None if self.color_jitter is None else self.color_jitter.make_params([])

    def apply_tensor(self, image: torch.Tensor, params: CropParams, jitter: Optional[dict],
                     normalize: bool = True) -> dict[str, torch.Tensor]:
        """`apply` for a decoded uint8 (3, H, W) tensor on any device: the same crop, flip and jitter,
        rendered with torch's antialiased bilinear resize (PIL's filter). `normalize=False` keeps
        the views uint8 (a quarter of the bytes to move); `normalize_views` finishes them."""
        left, upper, right, lower = params.box
        crop = image[:, upper:lower, left:right]
        student_view = _resize_tensor(crop, self.student_size, params.flip)
        if jitter is not None:
            student_view = self.color_jitter.transform(student_view, jitter)
        views = {"student_image": student_view, "teacher_image": _resize_tensor(crop, self.teacher_size, params.flip)}
        return normalize_views(views) if normalize else views

    def apply(self, image: Image.Image, params: CropParams, teacher_view: bool = True) -> dict[str, torch.Tensor]:
        """Both views, or only the student's when the teacher's output comes from a cache
        (rendering the large teacher view would cost as much as the rest of the sample)."""
        student_view = _render_view(image, self.student_size, params)
        if self.color_jitter is not None:
            student_view = self.color_jitter(student_view)
        views = {"student_image": _normalize(student_view)}
        if teacher_view:
            views["teacher_image"] = _normalize(_render_view(image, self.teacher_size, params))
        return views

    def __call__(self, image: Image.Image) -> dict[str, torch.Tensor]:
        return self.apply(image, self.sample_params(image))


class EvalTransform:
    """Resize the whole image to both square sizes, without cropping.

    The exported student runs at one fixed square size on whole frames, so evaluation feeds it
    exactly that rather than a centre crop it will never see in deployment.
    """

    def __init__(self, teacher_size: int, student_size: int) -> None:
        check_input_sizes(teacher_size, student_size)
        self.teacher_size = teacher_size
        self.student_size = student_size

    def __call__(self, image: Image.Image) -> dict[str, torch.Tensor]:
        whole = CropParams(box=(0, 0, image.width, image.height), flip=False)
        return {
            "teacher_image": _normalize(_render_view(image, self.teacher_size, whole)),
            "student_image": _normalize(_render_view(image, self.student_size, whole)),
        }


def check_input_sizes(teacher_size: int, student_size: int) -> None:
    check_multiple("teacher_size", teacher_size, TEACHER_MULTIPLE)
    check_multiple("student_size", student_size, STUDENT_MULTIPLE)


def _render_view(image: Image.Image, size: int, params: CropParams) -> Image.Image:
    # resize(box=...) crops and resizes in one pass, without copying the crop; PIL widens the
    # bilinear filter when shrinking, so this is antialiased.
    view = image.resize((size, size), Image.Resampling.BILINEAR, box=params.box)
    return view.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if params.flip else view


def _resize_tensor(crop: torch.Tensor, size: int, flip: bool) -> torch.Tensor:
    view = F.resize(crop, [size, size], interpolation=v2.InterpolationMode.BILINEAR, antialias=True)
    return view.flip(-1) if flip else view


def normalize_views(views: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """uint8 views (one image or a batch) -> float32 in [0, 1], then ImageNet-normalised."""
    return {name: F.normalize(F.to_dtype(view, torch.float32, scale=True), list(IMAGENET_MEAN), list(IMAGENET_STD))
            for name, view in views.items()}


def _normalize(image: Image.Image) -> torch.Tensor:
    tensor = F.to_dtype(F.pil_to_tensor(image), torch.float32, scale=True)  # (3, H, W) in [0, 1]
    return F.normalize(tensor, list(IMAGENET_MEAN), list(IMAGENET_STD))
