"""The zero-shot benchmark harness (`python -m trainer.benchmark`): each on-disk format read, the
protocols' known answers through the whole harness, crops, ranges and masks applied, DA-2K's
pairwise accuracy, one-line errors, and the same table from 1 and 2 processes."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.benchmark_files import (DA2K_PAIRS, make_benchmark_root, make_kitti, make_nyu, make_nyu_marigold,
                                   write_dpt)
from tests.conftest import save_student_folder
from tests.launching import launch_env
from tests.warm import run_warm
from trainer.benchmark.harness import BenchmarkDataset, format_table, gaps, run_benchmark
from trainer.benchmark.models import BenchmarkModel
from trainer.benchmark.readers import open_reader
from trainer.benchmark.suites import BENCHMARKS, PROTOCOLS
from trainer.benchmark.run import main

REPO = Path(__file__).resolve().parents[1]
DEPTH_BENCHMARKS = ("nyu", "kitti", "eth3d", "diode", "sintel", "synthetic")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return make_benchmark_root(tmp_path_factory.mktemp("benchmarks"))


# --- an oracle: a "model" that predicts a chosen function of each photo's ground truth ----------

def _pixels(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float()  # (3, H, W), exact


def _key(pixels: torch.Tensor) -> str:
    return hashlib.sha1(pixels.to(torch.uint8).cpu().numpy().tobytes()).hexdigest()


def oracle(name: str, reader, disparity_of, is_teacher: bool = False) -> BenchmarkModel:
    """Predicts disparity_of(sample) for each sample of `reader`, at the photo's own size."""
    table = {}
    for index in range(len(reader)):
        sample = reader.load(index)
        table[_key(_pixels(sample.image))] = torch.as_tensor(disparity_of(sample), dtype=torch.float32)[None, None]

    def predict(images: torch.Tensor) -> torch.Tensor:
        return table[_key(images[0])]

    return BenchmarkModel(name, is_teacher, _pixels, predict, "the photo's pixels")


def true_disparity(sample) -> np.ndarray:
    """1 / depth where measured, a wrong value (0.5) elsewhere."""
    usable = sample.real & np.isfinite(sample.depth) & (sample.depth > 0)
    return np.where(usable, 1.0 / np.where(usable, sample.depth, 1.0), 0.5)


def score(root: Path, name: str, disparity_of, protocol: str = "disparity", num_workers: int = 0) -> dict:
    from accelerate import Accelerator

    reader = open_reader(name, root / name)
    benchmark = BENCHMARKS[name]
    model = oracle("oracle", reader, disparity_of)
    return run_benchmark(Accelerator(cpu=True), [model], BenchmarkDataset(reader, benchmark, [model]),
                         PROTOCOLS[protocol], num_workers=num_workers)["oracle"]


# --- the formats ---------------------------------------------------------------------------------

def test_nyu_official_mat_reads_the_test_split_upright(tmp_path):
    """MATLAB stores the labeled set column-major (h5py sees images as N x 3 x W x H): the reader
    gives back the photo and raw depth the .mat holds, for the 1-based test indices of splits.mat."""
    arrays = make_nyu(tmp_path / "nyu", np.random.default_rng(0), count=5, test=(2, 5))
    reader = open_reader("nyu", tmp_path / "nyu")
    assert len(reader) == 2
    for index, number in enumerate((2, 5)):
        sample = reader.load(index)
        np.testing.assert_array_equal(np.asarray(sample.image), arrays["images"][..., number - 1])
        np.testing.assert_array_equal(sample.depth, arrays["rawDepths"][..., number - 1])
    assert not reader.load(0).real[0].any() and reader.load(0).real[1:].all()  # raw depth 0 = unmeasured


def test_each_format_is_read_with_its_units_and_masks(root):
    kitti = open_reader("kitti", root / "kitti")
    assert len(kitti) == 3  # the list's "None" line (no annotated depth) is skipped
    sample = kitti.load(0)
    stored = np.asarray(Image.open(root / "kitti" / kitti.rows[0][1]), dtype=np.float64)
    np.testing.assert_allclose(sample.depth, stored / 256)  # uint16 / 256 = metres
    assert sample.real.tolist() == (stored > 0).tolist()

    eth3d = open_reader("eth3d", root / "eth3d").load(0)
    assert eth3d.depth.shape == (32, 48) and not eth3d.real[:4].any() and eth3d.real[4:].all()  # inf = none

    diode = open_reader("diode", root / "diode").load(0)
    assert diode.depth.shape == (24, 32) and not diode.real[:, :3].any() and diode.real[:, 3:].all()

    sintel = open_reader("sintel", root / "sintel")
    assert len(sintel) == 3 and sintel.load(0).depth[0, :5].tolist() == [500.0] * 5

    da2k = open_reader("da2k", root / "da2k")
    pairs = dict(da2k.rows)
    # The closer point comes first, whichever of point1 / point2 the file marks.
    assert pairs["images/indoor/room.jpg"][:2].tolist() == [[5, 5, 20, 30], [12, 35, 10, 10]]


def test_marigold_nyu_layout(tmp_path):
    make_nyu_marigold(tmp_path / "nyu", np.random.default_rng(0))
    reader = open_reader("nyu", tmp_path / "nyu")
    assert len(reader) == 3 and reader.layout == "filename_list_test.txt"
    assert 0.5 <= reader.load(0).depth.min() and reader.load(0).depth.max() < 9.5  # millimetres / 1000
    assert score(tmp_path, "nyu", true_disparity)["abs_rel"] == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("name, list_name", [("diode", "diode_val_all_filename_list.txt"),
                                             ("eth3d", "eth3d_filename_list.txt")])
def test_marigold_tars_are_read_in_place(root, tmp_path, name, list_name):
    """Marigold's list beside its uncompressed tar, members under one top folder: read without
    extracting, the same samples as the files themselves, also from DataLoader workers."""
    extracted = open_reader(name, root / name)
    folder = tmp_path / name
    folder.mkdir()
    (folder / list_name).write_text("".join(" ".join(row) + "\n" for row in extracted.rows))
    with tarfile.open(folder / f"{name}.tar", "w") as tar:
        for row in extracted.rows:
            for member in row:
                tar.add(root / name / member, arcname=f"{name}_eval/{member}")
    reader = open_reader(name, folder)
    assert reader.layout == f"{list_name} + {name}.tar" and len(reader) == len(extracted) == 3
    for index in range(3):
        tarred, original = reader.load(index), extracted.load(index)
        np.testing.assert_array_equal(np.asarray(tarred.image), np.asarray(original.image))
        np.testing.assert_array_equal(tarred.depth, original.depth)
        np.testing.assert_array_equal(tarred.real, original.real)
    assert score(tmp_path, name, true_disparity, num_workers=2)["abs_rel"] == pytest.approx(0, abs=1e-6)


# --- the protocols' known answers ----------------------------------------------------------------

@pytest.mark.parametrize("name", DEPTH_BENCHMARKS)
@pytest.mark.parametrize("protocol", list(PROTOCOLS))
def test_a_perfect_prediction_scores_zero_error(root, name, protocol):
    metrics = score(root, name, true_disparity, protocol)
    assert metrics["num_images"] == 3
    assert metrics["abs_rel"] == pytest.approx(0, abs=1e-6)
    assert metrics["rmse"] == pytest.approx(0, abs=1e-4)
    assert metrics["delta1"] == 1.0


@pytest.mark.parametrize("name", DEPTH_BENCHMARKS)
def test_an_affine_disparity_is_exact_in_the_disparity_protocol_only(root, name):
    def affine(sample):
        return 3.0 * true_disparity(sample) + 0.2

    assert score(root, name, affine, "disparity")["abs_rel"] == pytest.approx(0, abs=1e-6)
    assert score(root, name, affine, "depth")["abs_rel"] > 0.02


def _window(shape: tuple[int, int], rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
    inside = np.zeros(shape, dtype=bool)
    inside[rows[0]:rows[1], cols[0]:cols[1]] = True
    return inside


def test_crops_are_the_published_windows():
    from core.choices import CROPS
    from data.datasets import crop_mask

    # Eigen's NYU crop on the 480 x 640 frame; Garg's KITTI crop on a 375 x 1242 frame, as BTS cuts it.
    assert crop_mask(480, 640, CROPS["eigen_nyu"]).numpy().tolist() == \
        _window((480, 640), (45, 471), (41, 601)).tolist()
    assert crop_mask(375, 1242, CROPS["garg_kitti"]).numpy().tolist() == \
        _window((375, 1242), (153, 371), (44, 1197)).tolist()


def _not_scored(name: str, sample) -> np.ndarray:
    """The measured pixels the fixtures put outside each benchmark's crop, range or mask, worked
    out by hand for the fixture sizes (tests/benchmark_files.py)."""
    if name == "nyu":
        excluded = ~_window((48, 64), (4, 47), (4, 60))  # Eigen crop at 48 x 64
    elif name == "kitti":
        excluded = ~_window((40, 132), (16, 39), (4, 127)) | (sample.depth >= 80)  # Garg crop, 80 m cap
    elif name == "sintel":
        excluded = sample.depth >= 70  # the 500 m background
    else:
        excluded = ~_window((24, 32), (0, 24), (3, 32))  # DIODE's mask: its first three columns
    return excluded | ~sample.real


@pytest.mark.parametrize("name", ["nyu", "kitti", "sintel", "diode"])
def test_wrong_values_outside_the_crop_range_or_mask_change_nothing(root, name):
    """NYU's Eigen crop, KITTI's Garg crop and 80 m cap, Sintel's 70 m cap, DIODE's mask: a wildly
    wrong prediction there is not scored; the same values inside are."""
    def wrong_outside(sample):
        excluded = _not_scored(name, sample)
        assert (excluded & np.isfinite(sample.depth) & (sample.depth > 0)).any()  # values the files hold
        return np.where(excluded, 50.0 * np.random.default_rng(0).random(excluded.shape) + 1e-3,
                        true_disparity(sample))

    assert score(root, name, wrong_outside)["abs_rel"] == pytest.approx(0, abs=1e-6)

    def wrong_inside(sample):
        disparity = true_disparity(sample).copy()
        disparity[sample.depth.shape[0] // 2, sample.depth.shape[1] // 2:] *= 7.0
        return disparity

    assert score(root, name, wrong_inside)["abs_rel"] > 1e-3


def test_each_model_gets_its_own_scores_from_one_pass(root):
    """Models share each decoded sample; their rows must not mix."""
    from accelerate import Accelerator

    reader = open_reader("nyu", root / "nyu")
    perfect = oracle("perfect", reader, true_disparity)
    doubled_depth = oracle("doubled", reader, lambda sample: true_disparity(sample) / 2)
    wrong = oracle("wrong", reader, lambda sample: 1.0 + 0 * true_disparity(sample))
    models = [wrong, perfect, doubled_depth]
    results = run_benchmark(Accelerator(cpu=True), models, BenchmarkDataset(reader, BENCHMARKS["nyu"], models),
                            PROTOCOLS["disparity"], num_workers=0)
    assert list(results) == ["wrong", "perfect", "doubled"]
    assert results["perfect"]["abs_rel"] == pytest.approx(0, abs=1e-6)
    assert results["doubled"]["abs_rel"] == pytest.approx(0, abs=1e-6)  # a scale is aligned away
    assert results["wrong"]["abs_rel"] > 0.1 and results["wrong"]["num_images"] == 3


def test_da2k_pairwise_accuracy_on_hand_made_pairs(root):
    """Room: point1 closer and predicted closer (right); point2 closer and predicted closer
    (right); point1 closer but predicted farther (wrong); a tie (wrong). Street: right. 3 of 5."""
    values = {"images/indoor/room.jpg": {(5, 5): 0.9, (20, 30): 0.1, (10, 10): 0.2, (12, 35): 0.8,
                                         (25, 5): 0.3, (3, 38): 0.7, (15, 15): 0.4, (16, 16): 0.4},
              "images/outdoor/street.jpg": {(2, 3): 0.1, (28, 39): 0.6}}
    reader = open_reader("da2k", root / "da2k")
    by_pixels = {}
    for name, _ in reader.rows:
        plane = np.full((30, 40), 0.5, dtype=np.float32)
        for (h, w), value in values[name].items():
            plane[h, w] = value
        by_pixels[_key(_pixels(Image.open(root / "da2k" / name).convert("RGB")))] = plane

    metrics = score(root, "da2k", lambda sample: by_pixels[_key(_pixels(sample.image))])
    assert metrics == {"accuracy": 3 / 5, "num_pairs": 5, "num_images": 2}
    assert sum(len(pairs) for pairs in DA2K_PAIRS.values()) == 5


def test_table_rows_columns_and_gap(root):
    teacher = BenchmarkModel("teacher:x", True, _pixels, None, "")
    student = BenchmarkModel("runs/s", False, _pixels, None, "")
    benchmarks = [BENCHMARKS["nyu"], BENCHMARKS["da2k"]]
    results = {"teacher:x": {"nyu": {"abs_rel": 0.05, "delta1": 0.97, "num_images": 654},
                             "da2k": {"accuracy": 0.9, "num_pairs": 2069, "num_images": 1035}},
               "runs/s": {"nyu": {"abs_rel": 0.08, "delta1": 0.93, "num_images": 654},
                          "da2k": {"accuracy": 0.85, "num_pairs": 2069, "num_images": 1035}}}
    table = format_table(results, [teacher, student], benchmarks, PROTOCOLS["disparity"]).splitlines()
    assert table[2] == "| model | NYUv2 AbsRel ↓ | NYUv2 δ1 ↑ | DA-2K acc ↑ |"
    assert table[4] == "| teacher:x | 0.050 | 0.970 | 0.900 |"
    assert table[5] == "| runs/s | 0.080 | 0.930 | 0.850 |"
    assert table[6] == "| gap: runs/s − teacher:x | +0.030 | -0.040 | -0.050 |"
    assert table[-1] == "Evaluated: NYUv2 654 images; DA-2K 1035 images, 2069 pairs."
    assert gaps(results, [student]) == {}  # no teacher, no gap


# --- the command line --------------------------------------------------------------------------

def run_cli(argv: list[str]) -> int:
    """The exit code of `python -m trainer.benchmark argv` (usage mistakes exit from argparse)."""
    try:
        return main(argv)
    except SystemExit as exit:
        return exit.code


def _error(capsys) -> str:
    captured = capsys.readouterr()
    lines = [line for line in (captured.out + captured.err).splitlines() if line.startswith("error:")]
    assert len(lines) == 1, captured.out + captured.err
    assert "Traceback" not in captured.err
    return lines[0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_student_folder(tmp_path_factory.mktemp("run") / "student_best", 64)


def test_cli_mistakes_are_one_line_each(root, checkpoint, tmp_path, capsys):
    (tmp_path / "taken.json").write_text("{}")
    cases = [
        (["--suite", "nyu,nyc"], "unknown --suite ['nyc']"),
        (["--root", str(tmp_path / "nowhere")], "no such folder"),
        (["--json", str(tmp_path / "taken.json")], "pass --overwrite"),
        (["--json", str(tmp_path / "no" / "m.json")], "does not exist"),
        (["--limit", "0"], "--limit 0 must be >= 1"),
        (["--teacher-size", "500"], "multiple of 14"),
        (["--suite", "nyu", "--root", str(tmp_path)], "nyu: no folder"),
    ]
    for extra, expected in cases:
        assert run_cli(["--model", str(checkpoint), "--root", str(root), *extra]) == 1
        assert expected in _error(capsys), extra
    assert (tmp_path / "taken.json").read_text() == "{}"

    assert run_cli(["--model", str(tmp_path / "missing"), "--root", str(root), "--suite", "da2k"]) == 1
    assert "no such student folder" in _error(capsys)


def test_cli_missing_split_file_is_named(tmp_path, checkpoint, capsys):
    make_nyu(tmp_path / "nyu", np.random.default_rng(0))
    (tmp_path / "nyu" / "splits.mat").unlink()
    assert run_cli(["--model", str(checkpoint), "--root", str(tmp_path), "--suite", "nyu"]) == 1
    assert "splits.mat is missing" in _error(capsys)


def test_cli_missing_and_corrupt_files(tmp_path, checkpoint, capsys):
    rng = np.random.default_rng(0)
    make_kitti(tmp_path / "kitti", rng)
    depth = next((tmp_path / "kitti" / "train").rglob("*.png"))
    depth.unlink()
    assert run_cli(["--model", str(checkpoint), "--root", str(tmp_path), "--suite", "kitti"]) == 1
    assert "kitti: 1 listed file missing" in _error(capsys)

    depth.write_bytes(b"not a png")
    assert run_cli(["--model", str(checkpoint), "--root", str(tmp_path), "--suite", "kitti", "--num-workers", "1"]) == 1
    error = _error(capsys)  # raised in a DataLoader worker, reported as its one line
    assert error.startswith("error: kitti: cannot read") and str(depth) in error

    sintel = tmp_path / "sintel" / "training" / "depth" / "alley_1" / "frame_0001.dpt"
    sintel.parent.mkdir(parents=True)
    photo = tmp_path / "sintel" / "training" / "final" / "alley_1" / "frame_0001.png"
    photo.parent.mkdir(parents=True)
    Image.new("RGB", (8, 4)).save(photo)
    write_dpt(sintel, np.ones((4, 9), dtype=np.float32))  # not the photo's 8 x 4
    assert run_cli(["--model", str(checkpoint), "--root", str(tmp_path), "--suite", "sintel",
                    "--num-workers", "0"]) == 1
    assert "does not match its photo's 8x4" in _error(capsys)


def test_model_kinds(checkpoint, tmp_path, tiny_teacher):
    from trainer.benchmark.models import load_benchmark_model

    cpu = torch.device("cpu")
    assert not load_benchmark_model(str(checkpoint), cpu).is_teacher
    tiny_teacher.save_pretrained(tmp_path / "teacher_folder")
    for spec in ("teacher:tiny", str(tmp_path / "teacher_folder")):
        model = load_benchmark_model(spec, cpu, teacher_size=70)
        assert model.is_teacher
        image = model.prepare(Image.new("RGB", (160, 100)))
        assert image.shape == (3, 70, 112)  # shorter side 70, aspect kept, multiples of 14
        assert model.predict(image[None]).shape == (1, 1, 70, 112)


def _benchmark(root: Path, models: list[str], out: Path, processes: int) -> subprocess.CompletedProcess:
    """`python -m trainer.benchmark` on N processes (warm ones, tests/warm.py)."""
    args = ["--root", str(root), "--teacher-size", "70", "--json", str(out), "--suite", ",".join(BENCHMARKS)]
    for model in models:
        args += ["--model", model]
    return run_warm("trainer.benchmark.run", args, launch_env(), processes)


def test_two_processes_give_the_same_table_as_one(root, checkpoint, tmp_path):
    """Teacher, student folder and its ONNX export on all six benchmarks (3 images each: the
    second process gets a padded shard), on 1 and 2 processes."""
    from modeling import load_student
    from trainer.ship.export import export_student

    onnx = tmp_path / "student.onnx"
    export_student(load_student(checkpoint), onnx, 64)
    models = ["teacher:tiny", str(checkpoint), str(onnx)]
    runs = {}
    for processes in (1, 2):
        result = _benchmark(root, models, tmp_path / f"{processes}.json", processes)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[processes] = (result.stdout, json.loads((tmp_path / f"{processes}.json").read_text()))
    (one_out, one), (two_out, two) = runs[1], runs[2]
    table = one_out[one_out.index("| model |"):one_out.index("Evaluated:")]
    assert table in two_out and two_out.count("| model |") == 1  # printed once, the same
    assert set(one["results"]) == set(models) and set(one["gaps"]) == {str(checkpoint), str(onnx)}
    for model in models:
        for name in BENCHMARKS:
            for metric, value in one["results"][model][name].items():
                assert two["results"][model][name][metric] == pytest.approx(value, rel=1e-5, abs=1e-6), \
                    (model, name, metric)
    assert one["results"]["teacher:tiny"]["nyu"]["num_images"] == 3
    assert one["results"]["teacher:tiny"]["da2k"] == {**one["results"]["teacher:tiny"]["da2k"], "num_pairs": 5}
    assert math.isfinite(one["results"][str(onnx)]["kitti"]["abs_rel"])
    # The ONNX file is the student: the same numbers through onnxruntime.
    for name in DEPTH_BENCHMARKS:
        assert one["results"][str(onnx)][name]["abs_rel"] == pytest.approx(
            one["results"][str(checkpoint)][name]["abs_rel"], rel=1e-3)
    assert one["protocol"]["name"] == "disparity" and one["benchmarks"]["kitti"]["crop"] == "garg_kitti"
    assert one["benchmarks"]["eth3d"]["max_depth"] is None  # no upper limit, written as plain JSON
