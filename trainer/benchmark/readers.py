"""Readers for the benchmark files as people have them on disk: the official downloads, and
Marigold's evaluation sets (its filename list beside the files, extracted or still in their tar).

Each reader lists its samples when it is opened (so a missing file is found before any model
runs) and loads one sample at a time: the photo as stored (no EXIF rotation: the ground truth
lies on the stored pixel grid) with its depth in metres and where that depth is measured, or, for
DA-2K, the photo with its annotated point pairs. `open_reader` picks the layout it finds.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
from PIL import Image

from trainer.console import plural

# Marigold's evaluation sets: a tar (extracted or not) beside the list Marigold ships in data_split/.
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


class FolderFiles:
    """A benchmark's files in a folder, named by their path relative to it."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def exists(self, name: str) -> bool:
        return (self.folder / name).is_file()

    def open(self, name: str):
        return open(self.folder / name, "rb")

    def where(self, name: str) -> str:
        return str(self.folder / name)


class TarFiles:
    """The members of an uncompressed tar, read in place: Marigold's evaluation sets come as tars
    of up to tens of GB. Names are the members' paths, or their paths below the tar's top folder
    when every member sits in one. Each process opens the tar itself (a file offset shared across
    fork would mix up concurrent reads)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with tarfile.open(path, "r:") as tar:
                members = {member.name.removeprefix("./"): member for member in tar if member.isfile()}
        except (OSError, tarfile.TarError) as error:
            raise BenchmarkDataError(f"{path} is not a readable uncompressed tar ({error})") from None
        tops = {name.split("/", 1)[0] for name in members}
        if len(tops) == 1 and all("/" in name for name in members):
            members.update({name.split("/", 1)[1]: member for name, member in list(members.items())})
        self.members = members
        self._tar, self._pid = None, None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tar": None, "_pid": None}

    def exists(self, name: str) -> bool:
        return name in self.members

    def open(self, name: str):
        if self._pid != os.getpid():
            self._tar, self._pid = tarfile.open(self.path, "r:"), os.getpid()
        return self._tar.extractfile(self.members[name])

    def where(self, name: str) -> str:
        return f"{self.path}:{name}"


def read_image(file) -> Image.Image:
    with Image.open(file) as image:
        return image.convert("RGB")


def read_png_depth(file, units_per_metre: float) -> np.ndarray:
    """16-bit PNG depth (NYU: millimetres, KITTI: 1/256 m); 0 means no measurement."""
    with Image.open(file) as image:
        return np.asarray(image, dtype=np.float32) / units_per_metre


def read_eth3d_depth(file, height: int, width: int) -> np.ndarray:
    """ETH3D's ground truth: raw little-endian float32, row-major, the image's size (the files
    end in .JPG like the photos); inf where there is no measurement."""
    data = np.frombuffer(file.read(), dtype="<f4")
    if data.size != height * width:
        raise BenchmarkDataError(f"holds {data.size} floats, not {height} x {width} for its photo")
    return data.reshape(height, width).copy()


def read_sintel_depth(file) -> np.ndarray:
    """Sintel's .dpt: float32 tag 202021.25, int32 width, int32 height, then float32 depth rows."""
    data = file.read()
    if len(data) < 12 or np.frombuffer(data[:4], dtype="<f4")[0] != SINTEL_TAG:
        raise BenchmarkDataError(f"is not a Sintel .dpt depth file (no {SINTEL_TAG} tag)")
    width, height = (int(side) for side in np.frombuffer(data[4:12], dtype="<i4"))
    depth = np.frombuffer(data[12:], dtype="<f4")
    if depth.size != width * height:
        raise BenchmarkDataError(f"holds {depth.size} depths, not {height} x {width}")
    return depth.reshape(height, width).copy()


def read_npy(file) -> np.ndarray:
    # Through BytesIO: numpy's np.load probes fileno(), which a tar member's reader lacks.
    return np.squeeze(np.load(io.BytesIO(file.read()), allow_pickle=False))


def read_npy_depth(file) -> np.ndarray:
    return read_npy(file).astype(np.float32)  # DIODE: (H, W, 1)


# Decoders as DepthFileReader calls them, (depth file, photo) -> (H, W) float32 metres; module-level
# functions, so a reader pickles into DataLoader workers under any start method.

def _nyu_png(file, image: Image.Image) -> np.ndarray:
    return read_png_depth(file, 1000.0)


def _kitti_png(file, image: Image.Image) -> np.ndarray:
    return read_png_depth(file, 256.0)


def _eth3d(file, image: Image.Image) -> np.ndarray:
    return read_eth3d_depth(file, image.height, image.width)


def _npy(file, image: Image.Image) -> np.ndarray:
    return read_npy_depth(file)


def _sintel(file, image: Image.Image) -> np.ndarray:
    return read_sintel_depth(file)


def _measured(depth: np.ndarray) -> np.ndarray:
    return np.isfinite(depth) & (depth > 0)


class Reader:
    """`rows` hold, first, the names of each sample's files in `files`; a subclass says how to
    load one."""

    def __init__(self, name: str, folder: Path, rows: list[tuple], layout: str,
                 files: FolderFiles | TarFiles | None = None) -> None:
        if not rows:
            raise BenchmarkDataError(f"{name}: no samples found in {folder} ({layout})")
        missing = [item for row in rows for item in row if isinstance(item, str) and not files.exists(item)]
        if missing:
            raise BenchmarkDataError(f"{name}: {plural(len(missing), 'listed file')} missing, "
                                     f"e.g. {files.where(missing[0])} ({layout})")
        self.name, self.folder, self.rows, self.layout, self.files = name, folder, rows, layout, files

    def __len__(self) -> int:
        return len(self.rows)

    def describe(self, index: int) -> str:
        return self.files.where(self.rows[index][0])

    def load(self, index: int) -> DepthSample | PairSample:
        raise NotImplementedError


class DepthFileReader(Reader):
    """Rows of (photo, depth file[, mask file]) with a depth decoder for the benchmark."""

    def __init__(self, name: str, folder: Path, rows: list[tuple[str, ...]], layout: str,
                 files: FolderFiles | TarFiles, decode) -> None:
        super().__init__(name, folder, rows, layout, files)
        self.decode = decode  # (depth file, image) -> (H, W) float32 metres

    def load(self, index: int) -> DepthSample:
        image_name, depth_name, *mask_name = self.rows[index]
        with self.files.open(image_name) as file:
            image = read_image(file)
        try:
            with self.files.open(depth_name) as file:
                depth = self.decode(file, image)
        except BenchmarkDataError as error:
            raise BenchmarkDataError(f"{self.files.where(depth_name)} {error}") from None
        if depth.shape != (image.height, image.width):
            raise BenchmarkDataError(f"{self.files.where(depth_name)}: depth {depth.shape[1]}x{depth.shape[0]} "
                                     f"does not match its photo's {image.width}x{image.height}")
        real = _measured(depth)
        if mask_name:  # DIODE ships where its scanner measured
            with self.files.open(mask_name[0]) as file:
                real &= read_npy(file).astype(bool)
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
            rows = [(path, _closer_first(pairs)) for path, pairs in sorted(entries.items())]
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as error:
            raise BenchmarkDataError(f"da2k: {annotations} is not a DA-2K annotation file "
                                     f"({type(error).__name__}: {error})") from None
        super().__init__("da2k", folder, rows, "annotations.json", FolderFiles(folder))

    def load(self, index: int) -> PairSample:
        name, pairs = self.rows[index]
        with self.files.open(name) as file:
            image = read_image(file)
        outside = (pairs[:, [0, 2]] >= image.height).any() or (pairs[:, [1, 3]] >= image.width).any()
        if outside or (pairs < 0).any():
            raise BenchmarkDataError(f"{self.files.where(name)}: an annotated point lies outside the "
                                     f"{image.width}x{image.height} photo")
        return PairSample(image, pairs)


def _closer_first(pairs: list[dict]) -> np.ndarray:
    rows = []
    for pair in pairs:
        if pair["closer_point"] not in ("point1", "point2"):
            raise ValueError(f"closer_point is {pair['closer_point']!r}, not 'point1' or 'point2'")
        near, far = ("point1", "point2") if pair["closer_point"] == "point1" else ("point2", "point1")
        rows.append([*pair[near], *pair[far]])
    return np.asarray(rows, dtype=np.int64).reshape(-1, 4)


def _list_rows(list_file: Path, columns: int) -> list[tuple[str, ...]]:
    """Lines of space-separated relative paths; a line whose depth is "None" (KITTI frames without
    annotated depth) is skipped, extra columns (KITTI's focal length) ignored."""
    rows = []
    for line in list_file.read_text().splitlines():
        fields = line.split()
        if not fields or fields[1:2] == ["None"]:
            continue
        if len(fields) < columns:
            raise BenchmarkDataError(f"{list_file}: line {line!r} has fewer than {columns} paths")
        rows.append(tuple(fields[:columns]))
    return rows


def _list_files(name: str, folder: Path, rows: list[tuple[str, ...]]) -> FolderFiles | TarFiles:
    """Where a list's files are: the folder, or else the one tar in it (Marigold's, not extracted)."""
    files = FolderFiles(folder)
    if not rows or files.exists(rows[0][0]):
        return files
    tars = sorted(folder.glob("*.tar"))
    if len(tars) > 1:
        raise BenchmarkDataError(f"{name}: {folder} holds {len(tars)} tars ({', '.join(t.name for t in tars)}); "
                                 f"keep the one of this benchmark")
    return TarFiles(tars[0]) if tars else files


def _kitti_rows(files: FolderFiles | TarFiles, rows: list[tuple[str, ...]]) -> list[tuple[str, str]]:
    """The list's photo paths are KITTI raw paths (2011_09_26/..._sync/image_02/data/...), its depth
    paths those of the annotated depth download (..._sync/proj_depth/groundtruth/image_02/...),
    which unpacks into train/ and val/: both trees may sit at the top or in raw/ and train/ or
    val/ below it."""
    def find(name: str, places: tuple[str, ...]) -> str:
        for candidate in (f"{place}{name}" for place in places):
            if files.exists(candidate):
                return candidate
        return name  # reported as missing

    return [(find(image, ("", "raw/")), find(depth, ("", "train/", "val/"))) for image, depth in rows]


def _scan(folder: Path, pattern: str, partner) -> list[tuple[str, ...]]:
    """(photo, depth[, mask]) names relative to `folder` for each depth file matching `pattern`."""
    return [tuple(path.relative_to(folder).as_posix() for path in partner(depth))
            for depth in sorted(folder.glob(pattern))]


def open_reader(name: str, folder: Path) -> Reader:
    """The reader for benchmark `name` in `folder`, in whichever layout the folder holds."""
    if not folder.is_dir():
        raise BenchmarkDataError(f"{name}: no folder {folder}; see the README's 'Zero-shot benchmarks' for "
                                 f"how to get it")
    marigold_list = folder / MARIGOLD_LISTS.get(name, "-")
    if marigold_list.is_file():
        rows = _list_rows(marigold_list, 3 if name == "diode" else 2)
        files = _list_files(name, folder, rows)
        layout = marigold_list.name + (f" + {files.path.name}" if isinstance(files, TarFiles) else "")
    if name == "nyu":
        if (folder / "nyu_depth_v2_labeled.mat").is_file():
            return NyuLabeledReader(folder)
        if marigold_list.is_file():
            return DepthFileReader(name, folder, rows, layout, files, _nyu_png)
        raise BenchmarkDataError(f"nyu: {folder} holds neither nyu_depth_v2_labeled.mat (+ splits.mat) nor "
                                 f"Marigold's {marigold_list.name}")
    if name == "kitti":
        if not marigold_list.is_file():
            raise BenchmarkDataError(f"kitti: {marigold_list} is missing: the Eigen test list with annotated "
                                     f"depth (from BTS or Marigold; README: 'Zero-shot benchmarks')")
        return DepthFileReader(name, folder, _kitti_rows(files, rows), layout, files, _kitti_png)
    folder_files = FolderFiles(folder)
    if name == "eth3d":
        if marigold_list.is_file():
            return DepthFileReader(name, folder, rows, layout, files, _eth3d)
        # each scene's <scene>_dslr_jpg.7z and <scene>_dslr_depth.7z unpacked into `folder`
        rows = _scan(folder, "*/ground_truth_depth/dslr_images/*",
                     lambda depth: (depth.parents[2] / "images" / "dslr_images" / depth.name, depth))
        return DepthFileReader(name, folder, rows, "<scene>/images/dslr_images + <scene>/ground_truth_depth/"
                               "dslr_images", folder_files, _eth3d)
    if name == "diode":
        if marigold_list.is_file():
            return DepthFileReader(name, folder, rows, layout, files, _npy)
        # val.tar.gz unpacked: val/{indoors,outdoor}/scene_*/scan_*/<name>.png + _depth(_mask).npy
        rows = _scan(folder, "**/*_depth.npy",
                     lambda depth: (depth.with_name(depth.name[:-len("_depth.npy")] + ".png"), depth,
                                    depth.with_name(depth.name[:-len(".npy")] + "_mask.npy")))
        return DepthFileReader(name, folder, rows, "<name>.png + <name>_depth.npy + <name>_depth_mask.npy",
                               folder_files, _npy)
    if name == "sintel":
        rows = _scan(folder, "training/depth/*/*.dpt",
                     lambda depth: (folder / "training" / "final" / depth.parent.name / f"{depth.stem}.png", depth))
        return DepthFileReader(name, folder, rows, "training/final/<scene>/*.png + training/depth/<scene>/*.dpt",
                               folder_files, _sintel)
    if name == "da2k":
        return Da2kReader(folder)
    if name == "synthetic":  # python -m data.synthetic --world test: depth 0 where invalid (sky, out of range)
        rows = _scan(folder, "depth/*.npy", lambda depth: (folder / "images" / f"{depth.stem}.png", depth))
        return DepthFileReader(name, folder, rows, "images/*.png + depth/*.npy (python -m data.synthetic)",
                               folder_files, _npy)
    raise ValueError(f"unknown benchmark {name!r}")


def expected_count_note(reader: Reader, images: Optional[int]) -> Optional[str]:
    """A note when a folder holds another number of samples than the published split."""
    if images is None or len(reader) == images:
        return None
    return (f"{reader.name}: {len(reader)} samples in {reader.folder} ({reader.layout}), not the published "
            f"{images}: the figures are not comparable with papers'")
