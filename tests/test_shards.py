"""Shards: written once (atomically, resumably, noticing a changed folder), read back by offset,
decoded and rendered in the workers or on the device with the folder pipeline's geometry."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from data.shards import ShardPhotoDataset, ShardSet, collate_encoded, shard_count
from data.transforms import TrainTransform
from tests.launching import launch_env
from tests.warm import run_warm
from trainer import prepare_shards as prepare_module
from trainer.config import ConfigError, load_config
from trainer.prepare_shards import prepare_shards
from trainer.train.inputs import EpochSeededDataset, build_datasets, build_loaders, select_photos, Targets

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "trainer" / "configs" / "demo.yaml")
SIZES = ["data.teacher_size=70", "data.student_size=64", "data.num_workers=0"]


def config(photos: Path, *extra: str):
    return load_config(DEMO, [f"data.train_dir={photos}", *SIZES, *extra])


def shard_config(shards: Path, *extra: str):
    return load_config(DEMO, [f"data.shards={shards}", *SIZES, *extra])


def test_shard_count_is_a_multiple_of_eight_per_writer_and_never_above_the_photos():
    assert shard_count(10_000, 1000, 1) == 16  # 10 needed -> 16, splits over 1, 2, 4, 8, 16 readers
    assert shard_count(10_000, 1000, 3) == 24
    assert shard_count(5, 1000, 1) == 5
    assert shard_count(0, 1000, 1) == 0


def test_prepare_writes_webdataset_shards_an_index_and_a_manifest(tmp_path, photo_dir):
    import webdataset

    (photo_dir / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    sideways = Image.new("RGB", (60, 40), (0, 0, 0))
    sideways.paste((255, 0, 0), (0, 0, 8, 8))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: displayed rotated 90 degrees clockwise
    sideways.save(photo_dir / "rotated.jpg", exif=exif)
    out = tmp_path / "shards"
    manifest = prepare_shards(config(photo_dir, "data.val_fraction=0"), out, photos_per_shard=2)

    assert manifest["splits"]["train"]["photos"] == 5 and manifest["splits"]["val"]["photos"] == 0
    assert manifest["skipped"] == [["train", "broken.jpg", "truncated JPEG"]]
    assert manifest["max_side"] == 140  # 2 x data.teacher_size: what the folder pipeline decodes
    shards = ShardSet.open(out)
    by_path = {photo.path: photo for photo in shards.photos["train"]}
    assert sorted(by_path) == sorted(p.name for p in photo_dir.iterdir() if p.name != "broken.jpg")
    rotated = Image.open(io.BytesIO(shards.read(by_path["rotated.jpg"])))
    assert rotated.size == (40, 60) and rotated.getpixel((36, 3))[0] > 200  # upright: the marker went top-right
    # Any WebDataset reader streams the same photos, and the index points at the same bytes.
    tars = sorted(str(path) for path in out.glob("train-*.tar"))
    streamed = {json.loads(sample["json"])["path"]: sample["jpg"]
                for sample in webdataset.WebDataset(tars, shardshuffle=False)}
    assert streamed.keys() == by_path.keys()
    for path, photo in by_path.items():
        assert streamed[path] == shards.read(photo), path


def test_an_interrupted_prepare_is_incomplete_and_a_rerun_keeps_the_finished_shards(tmp_path, photo_dir, monkeypatch):
    out = tmp_path / "shards"
    cfg = config(photo_dir, "data.val_fraction=0")
    real_write, calls = prepare_module.write_shard, []

    def crash_on_the_third(*args, **kwargs):
        calls.append(args[2])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_write(*args, **kwargs)

    monkeypatch.setattr(prepare_module, "write_shard", crash_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        prepare_shards(cfg, out, photos_per_shard=1)
    assert not (out / "manifest.json").exists() and not list(out.glob(".tmp_*"))
    with pytest.raises(ConfigError, match="no manifest.json: not a shard folder, or its writing was interrupted"):
        select_photos(shard_config(out))
    finished = {path.name: path.stat().st_mtime_ns for path in out.glob("train-*.tar")}
    assert len(finished) == 2

    calls.clear()
    monkeypatch.setattr(prepare_module, "write_shard", real_write)
    manifest = prepare_shards(cfg, out, photos_per_shard=1)
    assert manifest["shards_kept"] == 2 and manifest["splits"]["train"]["photos"] == 4
    assert {name: (out / name).stat().st_mtime_ns for name in finished} == finished  # not rewritten
    fresh = tmp_path / "fresh"
    prepare_shards(cfg, fresh, photos_per_shard=1)
    assert json.loads((out / "index.json").read_text()) == json.loads((fresh / "index.json").read_text())


def test_a_rerun_on_a_changed_folder_says_what_changed(tmp_path, photo_dir, capsys):
    out = tmp_path / "shards"
    cfg = config(photo_dir, "data.val_fraction=0")
    prepare_shards(cfg, out, photos_per_shard=1)
    first = sorted(photo_dir.iterdir())[0]
    Image.new("RGB", (50, 30), (0, 200, 0)).save(first)  # modified
    shutil.copy(sorted(photo_dir.iterdir())[1], photo_dir / "zz_new.jpg")  # added
    capsys.readouterr()
    manifest = prepare_shards(cfg, out, photos_per_shard=1)
    assert manifest["changes_since_previous"] == {"added": 1, "removed": 0, "changed": 1}
    assert "1 added, 0 removed, 1 modified" in capsys.readouterr().out
    photos = {photo.path: photo for photo in ShardSet.open(out).photos["train"]}
    assert "zz_new.jpg" in photos and (photos[first.name].width, photos[first.name].height) == (50, 30)
    assert len(list(out.glob("train-*.tar"))) == 5


def test_prepare_refuses_a_folder_of_other_files_and_touches_nothing(tmp_path, photo_dir):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    result = run_warm("trainer.prepare_shards", ["--config", DEMO, "--out", str(out), f"data.train_dir={photo_dir}",
                                                 *SIZES])
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: {out} holds files that are not photo shards (e.g. notes.txt); choose an empty or new --out"]
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"


def test_two_writer_processes_refuse_a_folder_of_other_files_in_one_line(tmp_path, photo_dir):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    result = run_warm("trainer.prepare_shards", ["--config", DEMO, "--out", str(out), f"data.train_dir={photo_dir}",
                                                 *SIZES], launch_env(), processes=2)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {out} holds files that are not photo shards (e.g. notes.txt); choose an empty or "
                      f"new --out"]
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_an_out_folder_that_cannot_be_made_is_one_line(tmp_path, photo_dir, capsys):
    (tmp_path / "a_file").write_text("x")
    code = prepare_module.main(["--config", DEMO, "--out", str(tmp_path / "a_file" / "shards"),
                                f"data.train_dir={photo_dir}", *SIZES])
    assert code == 1
    (line,) = capsys.readouterr().err.strip().splitlines()[-1:]
    assert line.startswith(f"error: cannot write shards to {tmp_path / 'a_file' / 'shards'} (")


def test_two_writer_processes_write_every_photo_once(tmp_path, photo_dir):
    out = tmp_path / "shards"
    result = run_warm("trainer.prepare_shards", ["--config", DEMO, "--out", str(out), f"data.train_dir={photo_dir}",
                                                 *SIZES, "data.val_fraction=0"], launch_env(), processes=2)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("unreadable skipped") == 1  # the summary, from the main process only
    photos = ShardSet.open(out).photos["train"]
    assert sorted(photo.path for photo in photos) == sorted(path.name for path in photo_dir.iterdir())
    assert len({photo.shard for photo in photos}) == 4  # 4 photos: one a shard (16 for 2 writers, capped)


@pytest.mark.parametrize("overrides, message", [
    (["data.shards=/nowhere/shards"], "data.shards: folder '/nowhere/shards' does not exist"),
    (["data.decode_on=device"], "'device' needs data.shards"),
    (["data.shards=x", "distill.teacher_cache=y"], "training from shards with distill.teacher_cache is not supported"),
])
def test_shard_settings_that_cannot_work_are_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message):
        select_photos(load_config(DEMO, overrides))


@pytest.fixture
def shard_dir(tmp_path, photo_dir) -> Path:
    prepare_shards(config(photo_dir, "data.val_fraction=0"), tmp_path / "shards", photos_per_shard=2)
    return tmp_path / "shards"


def _batch(cfg, indices: list[int], epoch: int = 0) -> dict:
    """The step's batch for these photos, as the trainer's loader and `finish_batch` make it."""
    train, _, _ = build_datasets(cfg, None, Targets.LIVE, select_photos(cfg))
    train.epoch = epoch
    dataset = train.dataset
    samples = [train[i] for i in indices]
    collate = collate_encoded if dataset.decode_on == "device" else torch.utils.data.default_collate
    return dataset.finish_batch(collate(samples), torch.device("cpu"))


def test_device_decoding_gives_the_workers_batch_exactly_on_cpu(shard_dir):
    workers = _batch(shard_config(shard_dir, "data.decode_on=workers"), [0, 1, 2, 3], epoch=1)
    device = _batch(shard_config(shard_dir, "data.decode_on=device"), [0, 1, 2, 3], epoch=1)
    assert workers.keys() == device.keys()
    for name in ("student_image", "teacher_image", "valid", "index"):
        assert torch.equal(workers[name], device[name]), name
    assert workers["student_image"].dtype == torch.float32 and workers["valid"].all()
    again = _batch(shard_config(shard_dir, "data.decode_on=workers"), [0, 1, 2, 3], epoch=2)
    assert not torch.equal(again["student_image"], workers["student_image"])  # a new epoch, new crops


@pytest.mark.parametrize("decode_on", ["workers", "device"])
def test_a_damaged_photo_in_a_shard_is_skipped_and_named(shard_dir, decode_on):
    cfg = shard_config(shard_dir, f"data.decode_on={decode_on}")
    photos = select_photos(cfg)
    victim = photos.train[1]
    with open(shard_dir / victim.shard, "r+b") as tar:  # the end of its JPEG, end marker included, zeroed
        tar.seek(victim.offset + victim.size // 2)
        tar.write(bytes(victim.size - victim.size // 2))
    batch = _batch(cfg, [0, 1, 2])
    assert batch["valid"].tolist() == [True, False, True]
    assert torch.isfinite(batch["student_image"]).all()  # a blank in its slot; the step fills it from photo 0
    dataset = ShardPhotoDataset(photos.shards, photos.train, TrainTransform(70, 64), decode_on)
    assert dataset.unreadable_reason(1) and dataset.unreadable_reason(0) == ""
    assert victim.path in dataset.paths[1] and victim.shard in dataset.paths[1]


def test_two_processes_see_every_photo_once_per_epoch_in_a_seeded_order(shard_dir):
    """What `accelerator.prepare` does to the trainer's loader on each of 2 processes."""
    from accelerate.data_loader import prepare_data_loader

    cfg = shard_config(shard_dir, "train.batch_size=1")
    train, _, _ = build_datasets(cfg, None, Targets.LIVE, select_photos(cfg))
    assert isinstance(train, EpochSeededDataset)
    orders = []
    for epoch in range(2):
        seen = []
        for rank in range(2):
            loader, _, _ = build_loaders(cfg, _FakeAccelerator(), train, None, None)
            # As the trainer's Accelerator prepares it: a sampler seeded alike on every process.
            sharded = prepare_data_loader(loader, num_processes=2, process_index=rank, put_on_device=False,
                                          use_seedable_sampler=True, data_seed=cfg.seed)
            sharded.set_epoch(epoch)
            seen.append([int(i) for batch in sharded for i in batch["index"]])
        assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == [0, 1, 2, 3], epoch
        orders.append(seen)
    assert orders[0] != orders[1]


class _FakeAccelerator:
    device = torch.device("cpu")
