"""Loading and transforming images for distillation and depth evaluation."""

from .datasets import CROPS, LabeledDepthDataset, UnlabeledImageDataset
from .images import (IMAGE_EXTENSIONS, ImageScan, describe_ignored, describe_unreadable, first_readable, list_images,
                     load_rgb, load_rgb_tensor, no_images_message, scan_images, split_train_val)
from .teacher_cache import (CacheDirError, CachedTeacherDataset, StaleCacheError, TeacherCache,
                            train_val_paths)
from .transforms import IMAGENET_MEAN, IMAGENET_STD, CropParams, EvalTransform, TrainTransform

__all__ = [
    "CROPS",
    "CacheDirError",
    "CachedTeacherDataset",
    "IMAGE_EXTENSIONS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CropParams",
    "EvalTransform",
    "ImageScan",
    "LabeledDepthDataset",
    "StaleCacheError",
    "TeacherCache",
    "TrainTransform",
    "UnlabeledImageDataset",
    "describe_ignored",
    "describe_unreadable",
    "first_readable",
    "list_images",
    "load_rgb",
    "load_rgb_tensor",
    "no_images_message",
    "scan_images",
    "split_train_val",
    "train_val_paths",
]
