"""The benchmarks and the two protocols, in one place: what each benchmark evaluates, its depth
range and crop, and where each value comes from. The README's tables are written from these.

Every benchmark is compared at the ground truth's own resolution: the prediction is upsampled
(bilinear) to it, never the ground truth resampled. A pixel counts when the files say its depth is
real (a positive, finite value; DIODE's mask), it lies inside the crop, and
min_depth < depth < max_depth. Metrics are computed per image and averaged over images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from core.choices import CROPS
from data.datasets import crop_mask
from data.synthetic import MAX_DEPTH as SYNTHETIC_MAX_DEPTH, MIN_DEPTH as SYNTHETIC_MIN_DEPTH


@dataclass(frozen=True)
class Benchmark:
    name: str  # the --suite name, and the folder under --root
    title: str  # its heading in the table
    split: str  # what is evaluated
    images: Optional[int]  # the split's published size (None: not a fixed number of depth maps)
    min_depth: float  # metres
    max_depth: float  # metres; math.inf where the benchmark sets no upper limit
    crop: Optional[str]  # a key of data.datasets.CROPS, applied to the valid mask
    source: str  # where the split, range and crop come from
    pairs: bool = False  # DA-2K: annotated point pairs instead of a depth map
    published: bool = True  # run by default; the synthetic world is run when named


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    Benchmark("nyu", "NYUv2", "the 654 test images of the official split (splits.mat testNdxs), raw depth",
              654, 1e-3, 10.0, "eigen_nyu",
              "split: Silberman et al. 2012; crop rows 45:471, cols 41:601 and range: Eigen et al. 2014, "
              "as in Marigold's nyu_dataset.py and BTS"),
    Benchmark("kitti", "KITTI", "the Eigen test split with annotated depth (eigen_test_files_with_gt.txt)",
              652, 1e-3, 80.0, "garg_kitti",
              "split: Eigen et al. 2014 (697 images, 652 with annotated depth); crop: Garg et al. 2016; "
              "80 m cap as in BTS and ZoeDepth"),
    Benchmark("eth3d", "ETH3D", "the 454 DSLR images of the high-res multi-view training scenes",
              454, 1e-5, math.inf, None, "Marigold's eth3d_dataset.py (no upper limit)"),
    Benchmark("diode", "DIODE", "the validation split, indoors and outdoor (325 + 446 images)",
              771, 0.6, 350.0, None, "Marigold's diode_dataset.py; the mask shipped with each depth map"),
    Benchmark("sintel", "Sintel", "the training set, final pass (23 scenes)",
              1064, 1e-3, 70.0, None, "DepthCrafter / Video Depth Anything benchmark (benchmark/eval/eval.py)"),
    Benchmark("da2k", "DA-2K", "the pairs of annotations.json: is the point marked closer predicted closer?",
              None, 0.0, math.inf, None, "Depth Anything V2 (Yang et al. 2024), DA-2K.md", pairs=True),
    Benchmark("synthetic", "Synthetic", "the held-out test world of python -m data.synthetic (textures and layouts "
              "no training world uses)", None, SYNTHETIC_MIN_DEPTH, SYNTHETIC_MAX_DEPTH, None,
              "data/synthetic.py: exact z-depth by ray casting; sky and anything beyond the range are invalid",
              published=False),
)}
PUBLISHED = tuple(name for name, benchmark in BENCHMARKS.items() if benchmark.published)


@dataclass(frozen=True)
class Protocol:
    name: str
    align: str  # the `align` mode of trainer.evaluate.metrics.depth_metrics
    definition: str
    source: str


PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (
    Protocol("disparity", "scale_shift",
             "per image, least-squares scale and shift of the predicted disparity to 1 / ground truth over "
             "the valid pixels; the aligned disparity floored at 1 / max_depth, then inverted to depth",
             "MiDaS (Ranftl et al. 2020) and Depth Anything V1/V2 zero-shot relative depth"),
    Protocol("depth", "depth_scale_shift",
             "per image, least-squares scale and shift of the predicted depth (1 / disparity) to the ground "
             "truth over the valid pixels; the aligned depth clipped to [min_depth, max_depth]",
             "Marigold (Ke et al. 2024), script/depth/eval.py with --alignment least_square"),
)}


def clip_depth(benchmark: Benchmark) -> Optional[float]:
    """The far limit the aligned prediction is clipped at: the benchmark's max_depth, or None (each
    image's farthest valid ground truth, depth_metrics' default) where the benchmark sets none."""
    return benchmark.max_depth if math.isfinite(benchmark.max_depth) else None


def evaluation_mask(depth: np.ndarray, real: np.ndarray, benchmark: Benchmark) -> torch.Tensor:
    """(H, W) bool: the pixels a prediction is scored on. `real` is where the files say the depth
    is measured; the range and the crop are the benchmark's."""
    depth_t = torch.from_numpy(depth)
    mask = torch.from_numpy(real) & torch.isfinite(depth_t)
    mask &= (depth_t > benchmark.min_depth) & (depth_t < benchmark.max_depth)
    if benchmark.crop is not None:
        mask &= crop_mask(*depth.shape, CROPS[benchmark.crop])
    return mask
