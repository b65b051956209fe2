"""The input normalisation both networks take: ImageNet's per-channel mean and standard deviation
of RGB in [0, 1]. The student records it in its config (`StudentDepthModel.image_mean/std`), the
exported files in their metadata; the data pipeline applies it."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
