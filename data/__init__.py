"""Loading and transforming images for distillation and depth evaluation."""

from .datasets import CROPS, LabeledDepthDataset, UnlabeledImageDataset
from .images import IMAGE_EXTENSIONS, list_images, load_rgb, split_train_val
from .teacher_cache import CachedTeacherDataset, StaleCacheError, TeacherCache, train_val_paths
from .transforms import IMAGENET_MEAN, IMAGENET_STD, CropParams, EvalTransform, TrainTransform

__all__ = [
    "CROPS",
    "CachedTeacherDataset",
    "IMAGE_EXTENSIONS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CropParams",
    "EvalTransform",
    "LabeledDepthDataset",
    "StaleCacheError",
    "TeacherCache",
    "TrainTransform",
    "UnlabeledImageDataset",
    "list_images",
    "load_rgb",
    "split_train_val",
    "train_val_paths",
]
