"""Tests for the teacher cache: data/teacher_cache.py (reading, cropping) and trainer/train/cache_teacher.py
(writing, CLI). Known answers: the live tiny teacher, and linear ramps that bilinear sampling keeps exact."""

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from torch.utils.data import DataLoader
from transformers import DepthAnythingForDepthEstimation

from data import (CacheDirError, CachedTeacherDataset, CropParams, StaleCacheError,
                  TeacherCache, TrainTransform, UnlabeledImageDataset, train_val_paths)
from data.teacher_cache import ShardWriter, check_cache_dir, clear_cache, content_hash, crop_map, write_index
from data.transforms import normalize
from modeling import DepthAnythingTeacher
from modeling.teacher import tiny_config
from tests.launching import launch_env
from tests.warm import run_warm
from trainer.train.cache_teacher import build_cache, main, open_cache, teacher_config_hash
from trainer.config import load_config
from trainer.train.inputs import EpochSeededDataset

SAMPLES = Path(__file__).parents[1] / "data" / "samples"
# 42 = 3 * 14 and 32 = 1 * 32; the photos are 84 = 2 * max(42, 32) square, so they decode unresized
# and an unaugmented crop is the whole photo.
TEACHER, STUDENT, SIDE = 42, 32, 84
FP16_ATOL = 5e-4  # fp16 rounding of disparities around 0.2-0.3 is <= 1.2e-4


def _square_photos(folder: Path, count: int = 3) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for source in sorted(SAMPLES.glob("*.jpg"))[:count]:
        with Image.open(source) as image:
            side = min(image.size)
            square = image.convert("RGB").crop((0, 0, side, side)).resize((SIDE, SIDE), Image.Resampling.BILINEAR)
        paths.append(folder / f"{source.stem}.png")
        square.save(paths[-1])
    return paths


def _config(folder: Path, *overrides: str):
    return load_config(None, [f"data.train_dir={folder}", "data.val_fraction=0.0", f"data.teacher_size={TEACHER}",
                              f"data.student_size={STUDENT}", "data.num_workers=0", "teacher.name=tiny",
                              "train.mixed_precision='no'", "eval.batch_size=2", *overrides])


def _plain(hflip_prob: float = 0.0) -> TrainTransform:
    return TrainTransform(TEACHER, STUDENT, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip_prob=hflip_prob, color_jitter=0.0)


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_teacher):
    """Three square photos and their cache, written by the real writer; tests only read these."""
    root = tmp_path_factory.mktemp("cache")
    paths = _square_photos(root / "photos")
    cfg = _config(root / "photos", f"distill.teacher_cache={root / 'cache'}")
    summary = build_cache(cfg, root / "cache", teacher=tiny_teacher)
    return cfg, paths, root / "cache", summary


def _open(cfg, teacher, paths):
    return open_cache(cfg, teacher, paths)


# --- the writer's files --------------------------------------------------------------------------


def test_cache_holds_fp16_shards_index_and_meta(built, tiny_teacher):
    cfg, paths, cache_dir, summary = built
    assert summary["num_images"] == 3 and summary["num_skipped"] == 0
    meta = json.loads((cache_dir / "meta.json").read_text())
    # The demo recipe has a feature term, so the teacher's features are stored beside its depth.
    assert meta == {"version": 2, "teacher": "tiny", "teacher_config_hash": teacher_config_hash(tiny_teacher),
                    "cache_size": TEACHER, "train_dir": str(cfg.data.train_dir), "num_images": 3, "num_skipped": 0,
                    "feature_layers": tiny_teacher.feature_layers,
                    "feature_channels": tiny_teacher.feature_channels[0]}
    index = json.loads((cache_dir / "index.json").read_text())
    assert sorted(index) == [p.name for p in paths]
    for path in paths:
        entry = index[path.name]
        assert entry["hash"] == content_hash(path.read_bytes())
        assert (entry["height"], entry["width"]) == (SIDE, SIDE)
        with safe_open(str(cache_dir / entry["shard"]), framework="pt") as shard:
            stored = shard.get_tensor(entry["hash"])
            features = shard.get_tensor(entry["hash"] + ".features")
        assert stored.dtype == torch.float16 and stored.shape == (1, TEACHER, TEACHER)
        grid = TEACHER // 14
        assert features.dtype == torch.float16 and features.shape == (4, tiny_teacher.feature_channels[0], grid, grid)
    assert summary["megabytes"] == pytest.approx(sum(p.stat().st_size for p in cache_dir.glob("shard_*")) / 1e6)
    assert not list(cache_dir.glob(".tmp_*"))


def test_shard_writer_splits_shards_and_stores_duplicates_once(tmp_path):
    writer = ShardWriter(tmp_path, rank=3, maps_per_shard=2)
    maps = torch.arange(3.0).reshape(3, 1, 1, 1).expand(3, 1, 2, 2)  # rows share storage, as a batch's do
    writer.add("a.png", "h0", 2, 2, maps[0])
    writer.add("copy_of_a.png", "h0", 2, 2, maps[0])
    writer.add("b.png", "h1", 2, 2, maps[1])
    writer.add("c.png", "h2", 2, 2, maps[2])
    writer.flush()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard_r3_00000.safetensors", "shard_r3_00001.safetensors"]
    assert writer.entries["copy_of_a.png"]["shard"] == writer.entries["a.png"]["shard"] == "shard_r3_00000.safetensors"
    assert writer.entries["c.png"]["shard"] == "shard_r3_00001.safetensors"
    with safe_open(str(tmp_path / "shard_r3_00001.safetensors"), framework="pt") as shard:
        assert torch.equal(shard.get_tensor("h2"), torch.full((1, 2, 2), 2.0, dtype=torch.float16))


def test_teacher_config_hash_ignores_provenance_and_tells_teachers_apart(tiny_teacher, tmp_path):
    tiny_teacher.save_pretrained(tmp_path / "saved")
    reloaded = DepthAnythingTeacher.from_pretrained(str(tmp_path / "saved"))  # other path, dtype recorded
    assert teacher_config_hash(reloaded) == teacher_config_hash(tiny_teacher)
    other = tiny_config()
    other.head_hidden_size = 4
    assert teacher_config_hash(DepthAnythingTeacher(DepthAnythingForDepthEstimation(other))) != \
        teacher_config_hash(tiny_teacher)
    # Same architecture, other weights (another fine-tune saved under the same path): different.
    assert teacher_config_hash(DepthAnythingTeacher.tiny(seed=1)) != teacher_config_hash(tiny_teacher)


# --- reading: the cached target against the live teacher -------------------------------------------


def test_crop_map_of_whole_photo_is_the_live_resize():
    whole = torch.randn(1, TEACHER, TEACHER)
    for size in (32, 64):
        expected = F.interpolate(whole[None], size=(size, size), mode="bilinear", align_corners=False)[0]
        torch.testing.assert_close(crop_map(whole, (0.0, 0.0, 1.0, 1.0), size, flip=False), expected)


def test_cached_target_equals_live_teacher_without_augmentation(built, tiny_teacher):
    cfg, paths, _, _ = built
    dataset = CachedTeacherDataset(paths, _plain(), _open(cfg, tiny_teacher, paths), with_teacher_image=True)
    for index in range(len(paths)):
        sample = dataset[index]
        assert sample["valid"] and sample["teacher_disparity"].dtype == torch.float32
        live = tiny_teacher(normalize(sample["teacher_image"][None]), output_size=(STUDENT, STUDENT)).disparity[0]
        target = sample["teacher_disparity"]
        assert target.shape == (1, STUDENT, STUDENT)
        torch.testing.assert_close(target, live, atol=FP16_ATOL, rtol=0)
        # The map has structure well beyond the tolerance, so a misplaced one would fail.
        assert (live - live.flip(-1)).abs().max() > 10 * FP16_ATOL


def test_forced_flip_flips_target_and_photo_alike(built, tiny_teacher):
    cfg, paths, _, _ = built
    cache = _open(cfg, tiny_teacher, paths)
    plain = CachedTeacherDataset(paths, _plain(), cache, with_teacher_image=False)[1]
    flipped = CachedTeacherDataset(paths, _plain(hflip_prob=1.0), cache, with_teacher_image=False)[1]
    assert "teacher_image" not in flipped
    torch.testing.assert_close(flipped["teacher_disparity"], plain["teacher_disparity"].flip(-1))
    torch.testing.assert_close(flipped["student_image"], plain["student_image"].flip(-1))
    assert not torch.allclose(flipped["teacher_disparity"], plain["teacher_disparity"], atol=FP16_ATOL, rtol=0)


def test_stored_features_equal_the_live_teachers_and_follow_the_flip(built, tiny_teacher):
    """The default recipe's feature term from the cache: for an unaugmented crop, the live
    teacher's features of the view, to fp16 rounding; a flip mirrors them on the patch grid."""
    cfg, paths, _, _ = built
    cache = open_cache(cfg, tiny_teacher, paths, with_features=True)
    plain = CachedTeacherDataset(paths, _plain(), cache, with_teacher_image=True, with_features=True)
    flipped = CachedTeacherDataset(paths, _plain(hflip_prob=1.0), cache, with_teacher_image=False, with_features=True)
    for index in range(len(paths)):
        sample = plain[index]
        live = torch.stack(tiny_teacher(normalize(sample["teacher_image"][None])).features, 1)[0]  # (layers, C, 3, 3)
        stored = sample["teacher_features"]
        assert stored.dtype == torch.float16 and stored.shape == live.shape
        torch.testing.assert_close(stored.float(), live, atol=2e-3 * live.abs().max().item(), rtol=1e-3)
        torch.testing.assert_close(flipped[index]["teacher_features"], stored.flip(-1))
        assert (live - live.flip(-1)).abs().max() > 0.1 * live.abs().max()  # a misplaced grid would fail
    # An unreadable photo's blank collates with the others: the same shape, from the cache's meta.
    assert plain.blank_sample()["teacher_features"].shape == stored.shape


def test_a_cache_without_features_is_refused_for_a_feature_term(tmp_path, tiny_teacher):
    paths = _square_photos(tmp_path / "photos", count=1)
    depth_only = _config(tmp_path / "photos", "distill.cache_features=drop")
    build_cache(depth_only, tmp_path / "cache", teacher=tiny_teacher)
    cfg = _config(tmp_path / "photos", f"distill.teacher_cache={tmp_path / 'cache'}")
    with pytest.raises(StaleCacheError, match="holds no teacher features, but this run's feature term needs layers "
                                              r"\[1, 2, 3, 4\].*or set distill.cache_features=live"):
        open_cache(cfg, tiny_teacher, paths, with_features=True)
    open_cache(cfg, tiny_teacher, paths)  # depth alone is there


def test_same_crops_as_the_uncached_dataset(built, tiny_teacher):
    """With the trainer's seeding, caching changes the target only, never the student's view."""
    cfg, paths, _, _ = built
    augment = TrainTransform(TEACHER, STUDENT)  # random crop, flip and jitter
    cached = EpochSeededDataset(CachedTeacherDataset(paths, augment, _open(cfg, tiny_teacher, paths), True), seed=5)
    live = EpochSeededDataset(UnlabeledImageDataset(paths, augment), seed=5)
    for index in range(len(paths)):
        for key in ("student_image", "teacher_image"):
            torch.testing.assert_close(cached[index][key], live[index][key])


@pytest.mark.parametrize("axis", ["x", "y"])
def test_crop_and_flip_place_the_map_under_the_photo(tmp_path, axis):
    """A ramp map holding each pixel's own position, and a bright marker in the photo: after a known
    crop + flip, the target is the expected ramp region and reads the marker's true position under it."""
    width, height, box = 120, 96, (50, 10, 110, 70)  # unresized: 120 <= 2 * max(42, 64)
    marker_x, marker_y = (80, 88), (30, 38)
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[marker_y[0]:marker_y[1], marker_x[0]:marker_x[1]] = 255
    photo = tmp_path / "marker.png"
    Image.fromarray(pixels).save(photo)
    centres = (torch.arange(TEACHER) + 0.5) / TEACHER  # each map pixel holds its own position, 0..1
    ramp = centres[None, None, :].expand(1, TEACHER, TEACHER) if axis == "x" else \
        centres[None, :, None].expand(1, TEACHER, TEACHER)
    writer = ShardWriter(tmp_path, rank=0)
    writer.add("marker.png", content_hash(photo.read_bytes()), height, width, ramp)
    writer.flush()
    write_index(tmp_path, writer.entries, {"teacher": "fake", "teacher_config_hash": "h", "cache_size": TEACHER})
    cache = TeacherCache.open(tmp_path, "fake", "h", TEACHER, [photo], tmp_path)
    size = 64
    transform = TrainTransform(TEACHER, size, color_jitter=0.0)
    transform.sample_params = lambda width, height: CropParams(box=box, flip=True)
    sample = CachedTeacherDataset([photo], transform, cache, with_teacher_image=False)[0]

    steps = (torch.arange(size) + 0.5) / size
    if axis == "x":  # output column j shows source column (box left .. right), mirrored
        expected = ((box[0] + (box[2] - box[0]) * steps) / width).flip(0)[None, None, :].expand(1, size, size)
    else:
        expected = ((box[1] + (box[3] - box[1]) * steps) / height)[None, :, None].expand(1, size, size)
    torch.testing.assert_close(sample["teacher_disparity"], expected, atol=1e-3, rtol=0)  # fp16 ramp

    brightness = sample["student_image"].float().mean(0)  # (size, size), uint8 levels
    row = int((brightness.sum(1) * torch.arange(size)).sum() / brightness.sum())
    col = int((brightness.sum(0) * torch.arange(size)).sum() / brightness.sum())
    truth = sum(marker_x) / 2 / width if axis == "x" else sum(marker_y) / 2 / height
    assert float(sample["teacher_disparity"][0, row, col]) == pytest.approx(truth, abs=0.015)


# --- staleness and bad files ---------------------------------------------------------------------


@pytest.fixture
def fresh(tmp_path, tiny_teacher):
    """A cache this test may damage."""
    paths = _square_photos(tmp_path / "photos")
    cfg = _config(tmp_path / "photos", f"distill.teacher_cache={tmp_path / 'cache'}")
    build_cache(cfg, tmp_path / "cache", teacher=tiny_teacher)
    return cfg, paths, tmp_path / "cache"


def test_changed_photo_is_refused_by_name(fresh, tiny_teacher, caplog):
    cfg, paths, cache_dir = fresh
    cache = _open(cfg, tiny_teacher, paths)
    dataset = CachedTeacherDataset(paths, _plain(), cache, with_teacher_image=False)
    with Image.open(paths[1]) as image:
        image.transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(paths[1])
    with caplog.at_level(logging.INFO):
        assert dataset[0]["valid"]
        # Mid-run, the changed photo is one skipped sample, not a crash, and no log line from a
        # worker: the trainer's main process asks why, once.
        assert not dataset[1]["valid"]
    assert not caplog.records
    assert dataset.unreadable_reason(0) == ""
    assert dataset.unreadable_reason(1) == (
        f"{paths[1]} changed since the teacher cache {cache_dir} was written; rebuild it with "
        f"`python -m trainer.train.cache_teacher --config <your config> --cache-dir {cache_dir}`")
    with pytest.raises(StaleCacheError, match=rf"{paths[1].name} changed since the teacher cache"):
        cache.get(paths[1], "0" * 16)


@pytest.mark.parametrize("field, value", [("teacher", "small"), ("teacher_config_hash", "0" * 16),
                                          ("cache_size", TEACHER + 14)])
def test_other_teacher_or_size_is_refused(built, field, value):
    cfg, paths, cache_dir, _ = built
    args = {"teacher": "tiny", "teacher_config_hash": json.loads((cache_dir / "meta.json").read_text())[
        "teacher_config_hash"], "cache_size": TEACHER, field: value}
    hint = rf"rebuild it with `python -m trainer.train.cache_teacher --config <your config> --cache-dir {cache_dir}`$"
    with pytest.raises(StaleCacheError, match=rf"has {field}=.* but this run needs .*; {hint}"):
        TeacherCache.open(cache_dir, args["teacher"], args["teacher_config_hash"], args["cache_size"], paths,
                          cfg.data.train_dir)


def test_uncached_photos_are_counted(built, tiny_teacher):
    cfg, paths, _, _ = built
    new = [Path(cfg.data.train_dir) / "new" / name for name in ("a.png", "b.png")]  # added since caching
    with pytest.raises(StaleCacheError, match=r"2 of 5 training images are not in teacher cache .*\(first: new/"):
        _open(cfg, tiny_teacher, paths + new)


def test_interrupted_cache_is_refused(fresh, tiny_teacher):
    cfg, paths, cache_dir = fresh
    (cache_dir / "meta.json").unlink()
    with pytest.raises(StaleCacheError, match="incomplete"):
        _open(cfg, tiny_teacher, paths)
    with pytest.raises(StaleCacheError, match=rf"does not exist; build it with .* --cache-dir {cache_dir / 'nope'}`"):
        TeacherCache.open(cache_dir / "nope", "tiny", "h", TEACHER, paths, cfg.data.train_dir)


def test_unreadable_photo_is_skipped_then_invalid_and_workers_read_shards(tmp_path, tiny_teacher, caplog):
    _square_photos(tmp_path / "photos")
    broken = tmp_path / "photos" / "broken.jpg"
    broken.write_bytes(b"not a JPEG")
    cfg = _config(tmp_path / "photos", f"distill.teacher_cache={tmp_path / 'cache'}")
    with caplog.at_level(logging.WARNING):
        summary = build_cache(cfg, tmp_path / "cache", teacher=tiny_teacher)
    assert (summary["num_images"], summary["num_skipped"]) == (3, 1)
    # The writer's loop says it once, with the reason; the dataset (in a worker) says nothing.
    assert [(r.name, r.getMessage()) for r in caplog.records] == [
        ("trainer.train.cache_teacher", f"skipping unreadable image {broken} (not an image (text))")]
    all_paths, _ = train_val_paths(cfg.data.train_dir, None, 0.0, cfg.seed)
    dataset = CachedTeacherDataset(all_paths, _plain(), _open(cfg, tiny_teacher, all_paths), with_teacher_image=True)
    in_main = [dataset[i] for i in range(len(dataset))]  # opens shard handles in this process first
    bad = all_paths.index(broken)
    assert not in_main[bad]["valid"] and not in_main[bad]["teacher_disparity"].any()
    assert in_main[bad]["teacher_image"].shape == (3, TEACHER, TEACHER)
    assert dataset.unreadable_reason(bad) == "not an image (text)"
    batch = next(iter(DataLoader(dataset, batch_size=len(dataset), num_workers=1)))  # a forked worker
    assert batch["valid"].tolist() == [i != bad for i in range(len(dataset))]
    torch.testing.assert_close(batch["teacher_disparity"], torch.stack([s["teacher_disparity"] for s in in_main]))
    Image.new("RGB", (SIDE, SIDE), (9, 9, 9)).save(broken, "JPEG")  # fixed later: now a changed photo
    with pytest.raises(StaleCacheError, match="broken.jpg changed"):
        dataset.cache.get(broken, "0" * 16)


def test_photo_unreadable_at_caching_time_is_named_as_such(tmp_path, tiny_teacher, monkeypatch):
    """A HEIC cached before pillow-heif was installed: unchanged since, yet without a map."""
    pillow_heif = pytest.importorskip("pillow_heif")
    if not pillow_heif.libheif_info().get("HEIF"):
        pytest.skip("this pillow-heif build has no HEVC encoder")
    paths = _square_photos(tmp_path / "photos", count=2)
    heic = tmp_path / "photos" / "IMG_0001.HEIC"
    Image.new("RGB", (SIDE, SIDE), (200, 90, 30)).save(heic, "HEIF")
    cfg = _config(tmp_path / "photos", f"distill.teacher_cache={tmp_path / 'cache'}")
    with monkeypatch.context() as without_heif:
        without_heif.setattr(Image, "ID", [name for name in Image.ID if name != "HEIF"])
        assert build_cache(cfg, tmp_path / "cache", teacher=tiny_teacher)["num_skipped"] == 1
    all_paths = sorted([*paths, heic])
    dataset = CachedTeacherDataset(all_paths, _plain(), _open(cfg, tiny_teacher, all_paths), with_teacher_image=False)
    index = all_paths.index(heic)
    assert not dataset[index]["valid"]
    assert dataset.unreadable_reason(index).startswith(
        f"{heic} could not be decoded when the teacher cache {tmp_path / 'cache'} was written, so it has no teacher "
        f"map; rebuild it with")


# --- where the writer writes -----------------------------------------------------------------------


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_rebuild_keeps_the_users_files_and_removes_only_the_caches(fresh, tiny_teacher):
    cfg, _, cache_dir = fresh
    users = {"notes.txt": b"mine", ".tmp_draft.txt": b"also mine", "shard_notes.safetensors.bak": b"mine too",
             "sub/index.json": b"{}"}
    for name, content in users.items():
        (cache_dir / name).parent.mkdir(exist_ok=True)
        (cache_dir / name).write_bytes(content)
    leftovers = [".tmp_shard_r0_00007.safetensors", ".tmp_meta.json", "shard_r5_00002.safetensors"]
    for name in leftovers:  # an interrupted write, and a shard of a run on more processes
        (cache_dir / name).write_bytes(b"old")
    build_cache(cfg, cache_dir, teacher=tiny_teacher)
    after = _tree(cache_dir)
    assert {name: after.get(name) for name in users} == users
    assert not set(leftovers) & set(after)
    assert {"meta.json", "index.json", "shard_r0_00000.safetensors"} <= set(after)


def test_a_folder_of_other_files_is_refused_and_left_untouched(tmp_path, tiny_teacher, capsys):
    folder = tmp_path / "photos"
    _square_photos(folder)
    (folder / "index.json").write_text('{"album": "holiday"}')  # another tool's index: not a cache's
    before = _tree(folder)
    cfg = _config(folder)
    message = f"{folder} holds files that are not a teacher cache; choose an empty or new --cache-dir"
    with pytest.raises(CacheDirError, match=f"^{message}$"):
        build_cache(cfg, folder, teacher=tiny_teacher)
    with pytest.raises(CacheDirError, match=f"^{message}$"):
        clear_cache(folder)
    assert _tree(folder) == before
    # A cache's shards beside a meta.json the writer did not make: writing would replace that file.
    cache_like = tmp_path / "cache_like"
    cache_like.mkdir()
    (cache_like / "shard_r0_00000.safetensors").write_bytes(b"old")
    (cache_like / "meta.json").write_text('{"title": "my project"}')
    with pytest.raises(CacheDirError, match="not a teacher cache"):
        clear_cache(cache_like)
    assert sorted(p.name for p in cache_like.iterdir()) == ["meta.json", "shard_r0_00000.safetensors"]
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(CacheDirError, match="is a file, not a folder"):
        check_cache_dir(tmp_path / "a_file")


def test_missing_or_empty_folder_is_taken(tmp_path):
    assert check_cache_dir(tmp_path / "new" / "cache") == []
    clear_cache(tmp_path / "new" / "cache")
    assert (tmp_path / "new" / "cache").is_dir()
    (tmp_path / "seen").mkdir()
    (tmp_path / "seen" / ".DS_Store").write_bytes(b"Finder")  # what opening a folder in Finder leaves
    clear_cache(tmp_path / "seen")
    assert (tmp_path / "seen" / ".DS_Store").read_bytes() == b"Finder"


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_cache_files_get_the_mode_of_any_new_file(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        writer = ShardWriter(tmp_path, rank=0)
        writer.add("a.png", "h0", 2, 2, torch.zeros(1, 2, 2))
        writer.flush()  # safetensors alone would leave it 0600: unreadable to a teammate's training job
        write_index(tmp_path, writer.entries, {"teacher": "fake", "teacher_config_hash": "h", "cache_size": 2})
    finally:
        os.umask(previous)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == {"shard_r0_00000.safetensors": mode, "index.json": mode, "meta.json": mode}


# --- the command line ----------------------------------------------------------------------------


def test_cli_caches_the_training_split(tmp_path):
    _square_photos(tmp_path / "photos", count=4)
    config = tmp_path / "run.yaml"
    config.write_text(f"seed: 3\ndata:\n  train_dir: {tmp_path / 'photos'}\n  val_fraction: 0.25\n"
                      f"  teacher_size: {TEACHER}\n  student_size: {STUDENT}\n  num_workers: 0\n"
                      f"teacher:\n  name: tiny\ntrain:\n  mixed_precision: 'no'\n")
    assert main(["--config", str(config)]) == 1  # no cache folder given anywhere
    assert main(["--config", str(config), "--cache-dir", str(tmp_path / "cache"), "eval.batch_size=2"]) == 0
    train, val = train_val_paths(tmp_path / "photos", None, 0.25, 3)
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    assert sorted(index) == [p.name for p in train] and len(train) == 3 and val[0].name not in index


def _write_config(path: Path, photos: Path) -> Path:
    path.write_text(f"data:\n  train_dir: {photos}\n  val_fraction: 0.0\n  teacher_size: {TEACHER}\n"
                    f"  student_size: {STUDENT}\n  num_workers: 0\nteacher:\n  name: tiny\n"
                    f"train:\n  mixed_precision: 'no'\n")
    return path


@pytest.mark.parametrize("mistake, expected", [
    ("missing train_dir", "data.train_dir: image folder"),
    ("bad yaml", "bad.yaml"),
    ("not a cache folder", "holds files that are not a teacher cache; choose an empty or new --cache-dir"),
    ("unloadable teacher", "teacher directory './no/such/teacher' does not exist"),
    ("stale cache", "teacher cache x is incomplete"),
])
def test_cli_reports_each_user_mistake_in_one_line(tmp_path, capsys, monkeypatch, mistake, expected):
    photos = tmp_path / "photos"
    _square_photos(photos, count=1)
    config = _write_config(tmp_path / "run.yaml", photos)
    args = ["--config", str(config), "--cache-dir", str(tmp_path / "cache")]
    if mistake == "missing train_dir":
        args.append(f"data.train_dir={tmp_path / 'nope'}")
    elif mistake == "bad yaml":
        (tmp_path / "bad.yaml").write_text("data:\n  train_dir: [unclosed\n")
        args[1] = str(tmp_path / "bad.yaml")
    elif mistake == "not a cache folder":
        args[3] = str(photos)
    elif mistake == "unloadable teacher":
        args.append("teacher.name=./no/such/teacher")
    else:
        def stale(*_args, **_kwargs):
            raise StaleCacheError("teacher cache x is incomplete")
        monkeypatch.setattr("trainer.train.cache_teacher.build_cache", stale)
    before = _tree(photos)
    assert main(args) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and expected in error and len(error.splitlines()) == 1, error
    assert _tree(photos) == before


def test_two_processes_refuse_a_folder_of_other_files_in_one_line(tmp_path):
    _square_photos(tmp_path / "photos", count=2)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    args = ["--cache-dir", str(out), "--config", "trainer/configs/demo.yaml", f"data.train_dir={tmp_path / 'photos'}"]
    result = run_warm("trainer.train.cache_teacher", args, launch_env(), processes=2)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {out} holds files that are not a teacher cache; choose an empty or new --cache-dir"]
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
