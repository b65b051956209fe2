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

    box: tuple[int, int, int, int]  # (left, upper, right, lower) in source pixels
    flip: bool


class TrainTransform:
    """One random crop + flip rendered at both input sizes; colour jitter on the student only.

    Teacher and student see the same region, so their outputs stay pixel-aligned for the
    distillation losses; only the student gets photometric noise, so it learns to match the
    teacher's clean prediction. Randomness comes from torch's global RNG, which the DataLoader
    seeds per worker.

    Works on decoded uint8 (3, H, W) tensors on any device (a folder's photos, shards, a batch
    decoded on the GPU: one rendering for every training pipeline) with torch's antialiased
    bilinear resize (PIL's filter), and gives uint8 views unless asked to normalise: a quarter of
    the bytes through the loader's shared memory and to the device, where `normalize_views` finishes them.
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

    def sample_params(self, width: int, height: int) -> CropParams:
        """One crop + flip for a photo of this size (only the size is read, so a device-side
        decode can draw it from an index before any pixel exists)."""
        # get_params reads only the image's size: a zero-stride tensor of that shape allocates nothing.
        like = torch.empty(()).expand(1, height, width)
        top, left, crop_height, crop_width = RandomResizedCrop.get_params(like, list(self.scale), list(self.ratio))
        flip = bool(torch.rand(()) < self.hflip_prob)
        return CropParams(box=(left, top, left + crop_width, top + crop_height), flip=flip)

    def sample_jitter(self) -> Optional[dict]:
        """One draw of the student's colour jitter (ColorJitter's own parameters), or None; drawn
        right after the crop."""
        return None if self.color_jitter is None else self.color_jitter.make_params([])

    def apply(self, image: torch.Tensor, params: CropParams, jitter: Optional[dict], normalize: bool = False,
              teacher_view: bool = True) -> dict[str, torch.Tensor]:
        """Both views of `image` for these draws, or only the student's when the teacher's output
        comes from a cache (rendering the large teacher view would cost as much as the rest)."""
        student_view = render_view(image, self.student_size, params)
        if jitter is not None:
            student_view = self.color_jitter.transform(student_view, jitter)
        views = {"student_image": student_view}
        if teacher_view:
            views["teacher_image"] = render_view(image, self.teacher_size, params)
        return normalize_views(views) if normalize else views

    def draw(self, width: int, height: int) -> tuple[CropParams, Optional[dict]]:
        """One sample's draws, crop then jitter: every pipeline draws them in this order, so the same
        seed gives the same views whichever renders them (workers, device, the teacher cache)."""
        return self.sample_params(width, height), self.sample_jitter()

    def __call__(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Fresh draws, uint8 views."""
        return self.apply(image, *self.draw(image.shape[-1], image.shape[-2]))


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
        # PIL widens the bilinear filter when shrinking, so this is antialiased.
        return {
            "teacher_image": _normalize(image.resize((self.teacher_size,) * 2, Image.Resampling.BILINEAR)),
            "student_image": _normalize(image.resize((self.student_size,) * 2, Image.Resampling.BILINEAR)),
        }


def check_input_sizes(teacher_size: int, student_size: int) -> None:
    check_multiple("teacher_size", teacher_size, TEACHER_MULTIPLE)
    check_multiple("student_size", student_size, STUDENT_MULTIPLE)


def render_view(image: torch.Tensor, size: int, params: CropParams) -> torch.Tensor:
    """The (3, size, size) view of the region `params.box` of a (3, H, W) tensor, mirrored if `params.flip`."""
    left, upper, right, lower = params.box
    view = F.resize(image[:, upper:lower, left:right], [size, size], interpolation=v2.InterpolationMode.BILINEAR,
                    antialias=True)
    return view.flip(-1) if params.flip else view


def normalize_views(views: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """uint8 views (one image or a batch each) -> `normalize`d."""
    return {name: normalize(view) for name, view in views.items()}


def normalize(view: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> float32 in [0, 1], then ImageNet-normalised."""
    return F.normalize(F.to_dtype(view, torch.float32, scale=True), list(IMAGENET_MEAN), list(IMAGENET_STD))


def _normalize(image: Image.Image) -> torch.Tensor:
    return normalize(F.pil_to_tensor(image))
