"""Readers for the benchmark files as people have them on disk: the official downloads, and
Marigold's extracted evaluation sets (a filename list beside the files).

Each reader lists its samples when it is opened (so a missing file is found before any model
runs) and loads one sample at a time: the photo as stored (no EXIF rotation: the ground truth
lies on the stored pixel grid) with its depth in metres and where that depth is measured, or, for
DA-2K, the photo with its annotated point pairs. `open_reader` picks the layout it finds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
from PIL import Image

from trainer.console import plural

# Marigold's evaluation sets: an extracted tar beside the list Marigold ships in data_split/.
MARIGOLD_LISTS = {
    "nyu": "filename_list_test.txt",
    "kitti": "eigen_test_files_with_gt.txt",
    "eth3d": "eth3d_filename_list.txt",
    "diode": "diode_val_all_filename_list.txt",
}
SINTEL_TAG = 202021.25  # the first float of every Sintel .dpt file


class BenchmarkDataError(ValueError):
    """A benchmark's files are missing or unreadable; the message says which and what to do."""


class DepthSample(NamedTuple):
    image: Image.Image  # RGB, as stored
    depth: np.ndarray  # (H, W) float32 metres, on the image's pixel grid
    real: np.ndarray  # (H, W) bool: where the files say the depth is measured


class PairSample(NamedTuple):
    image: Image.Image
    pairs: np.ndarray  # (K, 4) int64 rows (h_near, w_near, h_far, w_far) in the image's pixels


def load_image(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def read_png_depth(path: Path, units_per_metre: float) -> np.ndarray:
    """16-bit PNG depth (NYU: millimetres, KITTI: 1/256 m); 0 means no measurement."""
    with Image.open(path) as image:
        return np.asarray(image, dtype=np.float32) / units_per_metre


def read_eth3d_depth(path: Path, height: int, width: int) -> np.ndarray:
    """ETH3D's ground truth: raw little-endian float32, row-major, the image's size (the files
    end in .JPG like the photos); inf where there is no measurement."""
    data = np.fromfile(path, dtype="<f4")
    if data.size != height * width:
        raise BenchmarkDataError(f"{path} holds {data.size} floats, not {height} x {width} for its photo")
    return data.reshape(height, width)


def read_sintel_depth(path: Path) -> np.ndarray:
    """Sintel's .dpt: float32 tag 202021.25, int32 width, int32 height, then float32 depth rows."""
    with open(path, "rb") as file:
        tag = np.fromfile(file, dtype="<f4", count=1)
        size = np.fromfile(file, dtype="<i4", count=2)
        if tag.size != 1 or tag[0] != SINTEL_TAG or size.size != 2:
            raise BenchmarkDataError(f"{path} is not a Sintel .dpt depth file (no {SINTEL_TAG} tag)")
        width, height = int(size[0]), int(size[1])
        data = np.fromfile(file, dtype="<f4")
    if data.size != width * height:
        raise BenchmarkDataError(f"{path} holds {data.size} depths, not {height} x {width}")
    return data.reshape(height, width)


def read_npy_depth(path: Path) -> np.ndarray:
    return np.squeeze(np.load(path)).astype(np.float32)  # DIODE: (H, W, 1)


# Decoders as DepthFileReader calls them, (depth path, photo) -> (H, W) float32 metres; module-level
# functions, so a reader pickles into DataLoader workers under any start method.

def _nyu_png(path: Path, image: Image.Image) -> np.ndarray:
    return read_png_depth(path, 1000.0)


def _kitti_png(path: Path, image: Image.Image) -> np.ndarray:
    return read_png_depth(path, 256.0)


def _eth3d(path: Path, image: Image.Image) -> np.ndarray:
    return read_eth3d_depth(path, image.height, image.width)


def _diode(path: Path, image: Image.Image) -> np.ndarray:
    return read_npy_depth(path)


def _sintel(path: Path, image: Image.Image) -> np.ndarray:
    return read_sintel_depth(path)


def _measured(depth: np.ndarray) -> np.ndarray:
    return np.isfinite(depth) & (depth > 0)


def _check_same_grid(image: Image.Image, depth: np.ndarray, depth_path: Path) -> None:
    if depth.shape != (image.height, image.width):
        raise BenchmarkDataError(f"{depth_path}: depth {depth.shape[1]}x{depth.shape[0]} does not match its "
                                 f"photo's {image.width}x{image.height}")


class Reader:
    """`rows` are tuples of paths; a subclass says how to load one."""

    def __init__(self, name: str, folder: Path, rows: list[tuple], layout: str) -> None:
        if not rows:
            raise BenchmarkDataError(f"{name}: no samples found in {folder} ({layout})")
        missing = [path for row in rows for path in row if isinstance(path, Path) and not path.is_file()]
        if missing:
            raise BenchmarkDataError(f"{name}: {plural(len(missing), 'listed file')} missing in {folder}, "
                                     f"e.g. {missing[0]} ({layout})")
        self.name, self.folder, self.rows, self.layout = name, folder, rows, layout

    def __len__(self) -> int:
        return len(self.rows)

    def describe(self, index: int) -> str:
        return str(self.rows[index][0])

    def load(self, index: int) -> DepthSample | PairSample:
        raise NotImplementedError


class DepthFileReader(Reader):
    """Rows of (photo, depth file[, mask file]) with a depth decoder for the benchmark."""

    def __init__(self, name: str, folder: Path, rows: list[tuple], layout: str, decode) -> None:
        super().__init__(name, folder, rows, layout)
        self.decode = decode  # (depth path, image) -> (H, W) float32 metres

    def load(self, index: int) -> DepthSample:
        image_path, depth_path, *mask_path = self.rows[index]
        image = load_image(image_path)
        depth = self.decode(depth_path, image)
        _check_same_grid(image, depth, depth_path)
        real = _measured(depth)
        if mask_path:  # DIODE ships where its scanner measured
            real &= np.squeeze(np.load(mask_path[0])).astype(bool)
        return DepthSample(image, depth, real)


class NyuLabeledReader(Reader):
    """The official `nyu_depth_v2_labeled.mat` (MATLAB v7.3, i.e. HDF5) with the official
    `splits.mat` (MATLAB v5). MATLAB stores arrays column-major, so h5py sees `images` as
    (1449, 3, 640, 480) and `rawDepths` as (1449, 640, 480): each is transposed back to 480 x 640.
    The raw (not in-painted `depths`) Kinect depth is the ground truth, 0 where unmeasured."""

    def __init__(self, folder: Path) -> None:
        import h5py
        from scipy.io import loadmat

        self.mat = folder / "nyu_depth_v2_labeled.mat"
        splits = folder / "splits.mat"
        if not splits.is_file():
            raise BenchmarkDataError(f"nyu: {splits} is missing; download the official splits.mat next to "
                                     f"nyu_depth_v2_labeled.mat (README: 'Zero-shot benchmarks')")
        try:
            test = np.asarray(loadmat(str(splits))["testNdxs"]).ravel().astype(np.int64) - 1  # 1-based
            with h5py.File(self.mat, "r") as mat:
                count = mat["images"].shape[0]
                if mat["rawDepths"].shape[0] != count:
                    raise BenchmarkDataError(f"nyu: {self.mat} holds {count} images but "
                                             f"{mat['rawDepths'].shape[0]} raw depth maps")
        except (OSError, KeyError, ValueError) as error:
            if isinstance(error, BenchmarkDataError):
                raise
            raise BenchmarkDataError(f"nyu: cannot read {self.mat} / {splits} as the official NYU Depth v2 files "
                                     f"({type(error).__name__}: {error})") from None
        if test.size and (test.min() < 0 or test.max() >= count):
            raise BenchmarkDataError(f"nyu: {splits} lists images up to {test.max() + 1}, but the .mat holds {count}")
        super().__init__("nyu", folder, [(int(i),) for i in test], "official labeled .mat + splits.mat")
        self._file = None  # opened in the process that loads: h5py handles do not cross fork/pickle

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_file": None}

    def describe(self, index: int) -> str:
        return f"{self.mat} image {self.rows[index][0] + 1}"

    def load(self, index: int) -> DepthSample:
        import h5py

        if self._file is None:
            self._file = h5py.File(self.mat, "r")
        number = self.rows[index][0]
        rgb = np.ascontiguousarray(self._file["images"][number].transpose(2, 1, 0))  # (480, 640, 3) uint8
        depth = np.ascontiguousarray(self._file["rawDepths"][number].T, dtype=np.float32)  # (480, 640) m
        return DepthSample(Image.fromarray(rgb), depth, _measured(depth))


class Da2kReader(Reader):
    """DA-2K's `annotations.json`: {image path: [{"point1": [h, w], "point2": [h, w],
    "closer_point": "point1" | "point2"}, ...]}, image paths relative to the folder."""

    def __init__(self, folder: Path) -> None:
        annotations = folder / "annotations.json"
        if not annotations.is_file():
            raise BenchmarkDataError(f"da2k: {annotations} is missing; download DA-2K (README: 'Zero-shot benchmarks')")
        try:
            entries = json.loads(annotations.read_text())
            rows = [(folder / path, _closer_first(pairs)) for path, pairs in sorted(entries.items())]
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as error:
            raise BenchmarkDataError(f"da2k: {annotations} is not a DA-2K annotation file "
                                     f"({type(error).__name__}: {error})") from None
        super().__init__("da2k", folder, rows, "annotations.json")

    def load(self, index: int) -> PairSample:
        path, pairs = self.rows[index]
        image = load_image(path)
        outside = (pairs[:, [0, 2]] >= image.height).any() or (pairs[:, [1, 3]] >= image.width).any()
        if outside or (pairs < 0).any():
            raise BenchmarkDataError(f"{path}: an annotated point lies outside the {image.width}x{image.height} photo")
        return PairSample(image, pairs)


def _closer_first(pairs: list[dict]) -> np.ndarray:
    rows = []
    for pair in pairs:
        if pair["closer_point"] not in ("point1", "point2"):
            raise ValueError(f"closer_point is {pair['closer_point']!r}, not 'point1' or 'point2'")
        near, far = ("point1", "point2") if pair["closer_point"] == "point1" else ("point2", "point1")
        rows.append([*pair[near], *pair[far]])
    return np.asarray(rows, dtype=np.int64).reshape(-1, 4)


def _list_rows(folder: Path, list_file: Path, columns: int) -> list[tuple[Path, ...]]:
    """Lines of space-separated paths relative to `folder`; a line whose depth is "None" (KITTI
    frames without annotated depth) is skipped, extra columns (KITTI's focal length) ignored."""
    rows = []
    for line in list_file.read_text().splitlines():
        fields = line.split()
        if not fields or fields[1:2] == ["None"]:
            continue
        if len(fields) < columns:
            raise BenchmarkDataError(f"{list_file}: line {line!r} has fewer than {columns} paths")
        rows.append(tuple(folder / field for field in fields[:columns]))
    return rows


def _kitti_rows(folder: Path, list_file: Path) -> list[tuple[Path, ...]]:
    """The list's photo paths are KITTI raw paths (2011_09_26/..._sync/image_02/data/...), its depth
    paths those of the annotated depth download (..._sync/proj_depth/groundtruth/image_02/...),
    which unpacks into train/ and val/: both trees may sit in `folder` itself or in raw/ and
    train/ or val/ below it."""
    def find(path: Path, places: tuple[str, ...]) -> Path:
        relative = path.relative_to(folder)
        for place in places:
            candidate = folder / place / relative
            if candidate.is_file():
                return candidate
        return path  # reported as missing

    return [(find(image, ("", "raw")), find(depth, ("", "train", "val")))
            for image, depth in _list_rows(folder, list_file, 2)]


def _scan(folder: Path, pattern: str, partner) -> list[tuple[Path, ...]]:
    return [(*partner(path),) for path in sorted(folder.glob(pattern))]


def open_reader(name: str, folder: Path) -> Reader:
    """The reader for benchmark `name` in `folder`, in whichever layout the folder holds."""
    if not folder.is_dir():
        raise BenchmarkDataError(f"{name}: no folder {folder}; see the README's 'Zero-shot benchmarks' for "
                                 f"how to get it")
    marigold_list = folder / MARIGOLD_LISTS.get(name, "-")
    if name == "nyu":
        if (folder / "nyu_depth_v2_labeled.mat").is_file():
            return NyuLabeledReader(folder)
        if marigold_list.is_file():
            return DepthFileReader(name, folder, _list_rows(folder, marigold_list, 2), marigold_list.name,
                                   _nyu_png)
        raise BenchmarkDataError(f"nyu: {folder} holds neither nyu_depth_v2_labeled.mat (+ splits.mat) nor "
                                 f"Marigold's {marigold_list.name}")
    if name == "kitti":
        if not marigold_list.is_file():
            raise BenchmarkDataError(f"kitti: {marigold_list} is missing: the Eigen test list with annotated "
                                     f"depth (from BTS or Marigold; README: 'Zero-shot benchmarks')")
        return DepthFileReader(name, folder, _kitti_rows(folder, marigold_list), marigold_list.name,
                               _kitti_png)
    if name == "eth3d":
        if marigold_list.is_file():
            rows = _list_rows(folder, marigold_list, 2)
            layout = marigold_list.name
        else:  # each scene's <scene>_dslr_jpg.7z and <scene>_dslr_depth.7z unpacked into `folder`
            rows = _scan(folder, "*/ground_truth_depth/dslr_images/*",
                         lambda depth: (depth.parents[2] / "images" / "dslr_images" / depth.name, depth))
            layout = "<scene>/images/dslr_images + <scene>/ground_truth_depth/dslr_images"
        return DepthFileReader(name, folder, rows, layout, _eth3d)
    if name == "diode":
        if marigold_list.is_file():
            rows, layout = _list_rows(folder, marigold_list, 3), marigold_list.name
        else:  # val.tar.gz unpacked: val/{indoors,outdoor}/scene_*/scan_*/<name>.png + _depth(_mask).npy
            rows = _scan(folder, "**/*_depth.npy",
                         lambda depth: (depth.with_name(depth.name[:-len("_depth.npy")] + ".png"), depth,
                                        depth.with_name(depth.name[:-len(".npy")] + "_mask.npy")))
            layout = "<name>.png + <name>_depth.npy + <name>_depth_mask.npy"
        return DepthFileReader(name, folder, rows, layout, _diode)
    if name == "sintel":
        rows = _scan(folder, "training/depth/*/*.dpt",
                     lambda depth: (folder / "training" / "final" / depth.parent.name / f"{depth.stem}.png", depth))
        return DepthFileReader(name, folder, rows, "training/final/<scene>/*.png + training/depth/<scene>/*.dpt",
                               _sintel)
    if name == "da2k":
        return Da2kReader(folder)
    raise ValueError(f"unknown benchmark {name!r}")


def expected_count_note(reader: Reader, images: Optional[int]) -> Optional[str]:
    """A note when a folder holds another number of samples than the published split."""
    if images is None or len(reader) == images:
        return None
    return (f"{reader.name}: {len(reader)} samples in {reader.folder} ({reader.layout}), not the published "
            f"{images}: the figures are not comparable with papers'")
