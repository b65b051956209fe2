"""Tiny benchmark folders in each exact on-disk format the readers take, with random photos and
depth: the official NYU .mat files, KITTI's list and 16-bit PNGs, ETH3D's raw float32 files, DIODE's
npy pairs, Sintel's .dpt files, DA-2K's annotations.json, and Marigold's NYU filename-list layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

SINTEL_TAG = 202021.25
# DA-2K pairs by image: ((h1, w1), (h2, w2), closer_point) as the annotation file writes them.
DA2K_PAIRS = {
    "images/indoor/room.jpg": [((5, 5), (20, 30), "point1"), ((10, 10), (12, 35), "point2"),
                               ((25, 5), (3, 38), "point1"), ((15, 15), (16, 16), "point1")],
    "images/outdoor/street.jpg": [((2, 3), (28, 39), "point2")],
}


def _photo(rng: np.random.Generator, height: int, width: int) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _depth(rng: np.random.Generator, height: int, width: int, low: float, high: float) -> np.ndarray:
    return rng.uniform(low, high, (height, width)).astype(np.float32)


def write_matlab_v73(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """An HDF5 file with MATLAB 7.3's 512-byte header block, arrays stored as MATLAB writes them
    (column-major: h5py sees the axes reversed)."""
    import h5py

    with h5py.File(path, "w", userblock_size=512) as mat:
        for name, array in arrays.items():
            mat.create_dataset(name, data=np.ascontiguousarray(array.transpose(*reversed(range(array.ndim)))))
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Thu Nov 26 2026 HDF5 schema 1.00 ."
    with open(path, "r+b") as file:
        file.write(header.ljust(116) + b"\0" * 8 + b"\x00\x02IM")


def make_nyu(folder: Path, rng: np.random.Generator, count: int = 5, test: tuple[int, ...] = (2, 3, 5),
             size: tuple[int, int] = (48, 64)) -> dict[str, np.ndarray]:
    """nyu_depth_v2_labeled.mat (images, depths, rawDepths) + splits.mat (1-based testNdxs)."""
    from scipy.io import savemat

    folder.mkdir(parents=True)
    height, width = size
    images = rng.integers(0, 256, (height, width, 3, count), dtype=np.uint8)  # MATLAB's H x W x 3 x N
    raw = _depth(rng, height, width * count, 0.5, 9.5).reshape(height, width, count)
    raw[0, :, 1] = 0  # unmeasured (image 2, in the test split)
    write_matlab_v73(folder / "nyu_depth_v2_labeled.mat",
                     {"images": images, "depths": raw + 0.1, "rawDepths": raw})
    train = [i for i in range(1, count + 1) if i not in test]
    savemat(folder / "splits.mat", {"trainNdxs": np.array(train, dtype=np.float64).reshape(-1, 1),
                                    "testNdxs": np.array(test, dtype=np.float64).reshape(-1, 1)})
    return {"images": images, "rawDepths": raw}


def make_nyu_marigold(folder: Path, rng: np.random.Generator, count: int = 3) -> None:
    """Marigold's extracted nyu_labeled_extracted.tar: test/<scene>/rgb_*.png, depth_*.png (mm), filled_*.png."""
    lines = []
    for index in range(1, count + 1):
        scene = folder / "test" / "kitchen_0004"
        scene.mkdir(parents=True, exist_ok=True)
        _photo(rng, 48, 64).save(scene / f"rgb_{index:04d}.png")
        millimetres = rng.integers(500, 9500, (48, 64)).astype(np.uint16)
        Image.fromarray(millimetres).save(scene / f"depth_{index:04d}.png")
        Image.fromarray(millimetres).save(scene / f"filled_{index:04d}.png")
        lines.append(f"test/kitchen_0004/rgb_{index:04d}.png test/kitchen_0004/depth_{index:04d}.png "
                     f"test/kitchen_0004/filled_{index:04d}.png")
    (folder / "filename_list_test.txt").write_text("\n".join(lines) + "\n")


def make_kitti(folder: Path, rng: np.random.Generator, count: int = 3, size: tuple[int, int] = (40, 132)) -> None:
    """Raw photos under raw/, annotated depth under train/ (as data_depth_annotated.zip unpacks),
    uint16 PNGs of metres x 256, 0 where no LiDAR point fell; the list has a None line."""
    height, width = size
    lines = []
    for index in range(count):
        drive = "2011_09_26_drive_0002_sync"
        image = folder / "raw" / "2011_09_26" / drive / "image_02" / "data" / f"{index:010d}.png"
        depth = folder / "train" / drive / "proj_depth" / "groundtruth" / "image_02" / f"{index:010d}.png"
        image.parent.mkdir(parents=True, exist_ok=True)
        depth.parent.mkdir(parents=True, exist_ok=True)
        _photo(rng, height, width).save(image)
        metres = _depth(rng, height, width, 2.0, 75.0)
        metres[rng.random((height, width)) < 0.5] = 0  # sparse, as projected LiDAR is
        metres[-3:, width // 2] = 85.0  # beyond the 80 m cap, inside the crop
        Image.fromarray(np.round(metres * 256).astype(np.uint16)).save(depth)
        lines.append(f"2011_09_26/{drive}/image_02/data/{index:010d}.png "
                     f"{drive}/proj_depth/groundtruth/image_02/{index:010d}.png 721.5377")
    lines.insert(1, f"2011_09_26/2011_09_26_drive_0002_sync/image_02/data/{99:010d}.png None 721.5377")
    (folder / "eigen_test_files_with_gt.txt").write_text("\n".join(lines) + "\n")


def make_eth3d(folder: Path, rng: np.random.Generator, size: tuple[int, int] = (32, 48)) -> None:
    """<scene>/images/dslr_images/*.JPG + <scene>/ground_truth_depth/dslr_images/*.JPG (raw float32, inf = none)."""
    height, width = size
    for scene, names in (("courtyard", ("DSC_0286", "DSC_0287")), ("office", ("DSC_0219",))):
        for name in names:
            image = folder / scene / "images" / "dslr_images" / f"{name}.JPG"
            depth = folder / scene / "ground_truth_depth" / "dslr_images" / f"{name}.JPG"
            image.parent.mkdir(parents=True, exist_ok=True)
            depth.parent.mkdir(parents=True, exist_ok=True)
            _photo(rng, height, width).save(image, format="JPEG", quality=95)
            metres = _depth(rng, height, width, 1.0, 40.0)
            metres[:4] = np.inf
            metres.astype("<f4").tofile(depth)


def make_diode(folder: Path, rng: np.random.Generator, size: tuple[int, int] = (24, 32)) -> None:
    """val/{indoors,outdoor}/scene_*/scan_*/<name>.png + <name>_depth.npy (H, W, 1) + <name>_depth_mask.npy."""
    height, width = size
    for split, name in (("indoors", "00019_00183_indoors_000_010"), ("outdoor", "00022_00194_outdoor_000_000"),
                        ("outdoor", "00022_00194_outdoor_000_010")):
        scan = folder / "val" / split / f"scene_{name[:5]}" / f"scan_{name[6:11]}"
        scan.mkdir(parents=True, exist_ok=True)
        _photo(rng, height, width).save(scan / f"{name}.png")
        metres = _depth(rng, height, width, 0.8, 300.0)
        np.save(scan / f"{name}_depth.npy", metres[..., None])
        mask = np.ones((height, width), dtype=np.float32)
        mask[:, :3] = 0
        np.save(scan / f"{name}_depth_mask.npy", mask)


def write_dpt(path: Path, depth: np.ndarray) -> None:
    with open(path, "wb") as file:
        np.array([SINTEL_TAG], dtype="<f4").tofile(file)
        np.array([depth.shape[1], depth.shape[0]], dtype="<i4").tofile(file)
        depth.astype("<f4").tofile(file)


def make_sintel(folder: Path, rng: np.random.Generator, size: tuple[int, int] = (22, 51)) -> None:
    """training/final/<scene>/frame_*.png + training/depth/<scene>/frame_*.dpt."""
    height, width = size
    for scene, frames in (("alley_1", (1, 2)), ("bamboo_2", (1,))):
        for frame in frames:
            image = folder / "training" / "final" / scene / f"frame_{frame:04d}.png"
            depth = folder / "training" / "depth" / scene / f"frame_{frame:04d}.dpt"
            image.parent.mkdir(parents=True, exist_ok=True)
            depth.parent.mkdir(parents=True, exist_ok=True)
            _photo(rng, height, width).save(image)
            metres = _depth(rng, height, width, 0.5, 60.0)
            metres[0, :5] = 500.0  # the far background, beyond the 70 m cap
            write_dpt(depth, metres)


def make_da2k(folder: Path, rng: np.random.Generator) -> None:
    annotations = {}
    for path, pairs in DA2K_PAIRS.items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        _photo(rng, 30, 40).save(folder / path, format="JPEG", quality=95)
        annotations[path] = [{"point1": list(p1), "point2": list(p2), "closer_point": closer}
                             for p1, p2, closer in pairs]
    (folder / "annotations.json").write_text(json.dumps(annotations, indent=1))


def make_benchmark_root(root: Path, seed: int = 0) -> Path:
    """Every benchmark under `root`, as `--root` expects it."""
    rng = np.random.default_rng(seed)
    make_nyu(root / "nyu", rng)
    make_kitti(root / "kitti", rng)
    make_eth3d(root / "eth3d", rng)
    make_diode(root / "diode", rng)
    make_sintel(root / "sintel", rng)
    make_da2k(root / "da2k", rng)
    make_synthetic(root / "synthetic")
    return root


def make_synthetic(folder: Path) -> None:
    """Three samples of the test world, written by the generator itself (its own format)."""
    from data.synthetic import WorldSpec, generate

    generate(folder, WorldSpec("test", 0, 48, 40), count=3)
