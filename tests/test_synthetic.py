"""The procedural world (data/synthetic.py): depth against closed-form answers, the sky mask, which
surface wins where two overlap, the split of textures between worlds, same bytes on any number of
processes, and the folder rules of `python -m data.synthetic`."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from data.synthetic import (MAX_DEPTH, TEXTURE_SPLIT, Camera, Scene, Surface, TextureBank, WorldSpec, main,
                            render, render_sample)

GREY = TextureBank([np.full((256, 256, 3), 0.5, np.float32)])


def scene_of(camera: Camera, *surfaces: Surface) -> Scene:
    return Scene(camera=camera, surfaces=(Surface("ground", (), 0, 1.0, (0.0, 0.0)), *surfaces),
                 sun=(0.0, 1.0, 0.0), sun_strength=0.8, ambient=0.3, haze=0.01, haze_colour=(0.7, 0.7, 0.7),
                 sky=((0.7, 0.7, 0.8), (0.2, 0.3, 0.7)))


def shape(kind: str, *params: float) -> Surface:
    return Surface(kind, tuple(float(p) for p in params), 0, 1.0, (0.0, 0.0))


def row_offsets(camera: Camera) -> np.ndarray:
    return (np.arange(camera.height_px) + 0.5 - camera.height_px / 2) / camera.focal


@pytest.mark.parametrize("height, pitch_deg, sky_seen", [(1.5, 10.0, True), (0.6, 25.0, False), (2.4, -3.0, True)])
def test_the_ground_plane_has_the_closed_form_depth_on_every_row(height, pitch_deg, sky_seen):
    """A flat ground seen from height h, pitched down by p: a row whose ray leaves the optical axis
    by y (image plane, focal 1) meets the ground at z-depth h / (sin p + y cos p), on every column;
    rows whose ray does not go down see the sky, and the mask leaves them out exactly."""
    camera = Camera(height=height, pitch=math.radians(pitch_deg), roll=0.0, hfov=math.radians(60), width=40,
                    height_px=30)
    _, depth = render(scene_of(camera), GREY)
    p = camera.pitch
    denominator = math.sin(p) + row_offsets(camera) * math.cos(p)
    expected = np.where(denominator > 0, height / np.where(denominator > 0, denominator, 1), np.inf)
    expected = np.where(expected < MAX_DEPTH, expected, 0.0)
    np.testing.assert_allclose(depth, np.repeat(expected[:, None], camera.width, 1), rtol=1e-5)
    assert (depth[denominator <= 0] == 0).all() and (denominator <= 0).any() == sky_seen


def straight_ahead(size: int = 33) -> Camera:
    """Level, odd-sized: the middle pixel's ray is the optical axis, at the camera's height."""
    return Camera(height=1.0, pitch=0.0, roll=0.0, hfov=math.radians(50), width=size, height_px=size)


def test_a_sphere_at_eye_height_has_the_closed_form_depth_wherever_it_is_seen():
    """Centre straight ahead at distance D: the ray (x, y, 1) meets it at
    t = (D - sqrt(D^2 - |d|^2 (D^2 - r^2))) / |d|^2 (its z-depth), wherever the root is real."""
    camera, distance, radius = straight_ahead(), 6.0, 0.8
    _, depth = render(scene_of(camera, shape("sphere", 0.0, 1.0, distance, radius)), GREY)
    middle = camera.width // 2
    assert depth[middle, middle] == pytest.approx(distance - radius, rel=1e-6)  # the nearest point
    offsets = (np.arange(camera.width) + 0.5 - camera.width / 2) / camera.focal
    y, x = np.meshgrid(offsets, offsets, indexing="ij")
    length2 = 1 + x ** 2 + y ** 2
    disc = distance ** 2 - length2 * (distance ** 2 - radius ** 2)
    seen = disc >= 0
    expected = (distance - np.sqrt(np.where(seen, disc, 0))) / length2
    assert 50 < seen.sum() < seen.size
    np.testing.assert_allclose(depth[seen], expected[seen], rtol=1e-5)
    assert not np.isclose(depth[~seen][:, None], expected[~seen][:, None]).all()


def test_a_box_face_on_and_a_cylinders_side_have_their_distance():
    camera = straight_ahead()
    middle = camera.width // 2
    _, box = render(scene_of(camera, shape("box", 0.0, 1.0, 5.0, 0.5, 1.0, 0.3, 0.0)), GREY)
    assert box[middle, middle] == pytest.approx(5.0 - 0.3, rel=1e-6)
    assert np.allclose(box[middle - 2:middle + 3, middle - 2:middle + 3], 4.7)  # a flat face: one depth
    _, cylinder = render(scene_of(camera, shape("cylinder", 0.0, 0.0, 4.0, 0.4, 2.0)), GREY)
    assert cylinder[middle, middle] == pytest.approx(4.0 - 0.4, rel=1e-6)


@pytest.mark.parametrize("near_first", [True, False])
def test_the_nearer_of_two_overlapping_objects_wins(near_first):
    camera = straight_ahead()
    middle = camera.width // 2
    near, far = shape("sphere", 0.0, 1.0, 4.0, 0.5), shape("box", 0.0, 1.0, 9.0, 2.0, 2.0, 0.5, 0.3)
    surfaces = (near, far) if near_first else (far, near)
    _, depth = render(scene_of(camera, *surfaces), GREY)
    assert depth[middle, middle] == pytest.approx(3.5, rel=1e-6)
    assert 8.0 < depth[middle, middle - 5] < 9.0  # beside the sphere, the box behind it


def test_the_worlds_share_no_texture():
    train, test = TEXTURE_SPLIT["train"], TEXTURE_SPLIT["test"]
    assert not set(train["photos"]) & set(test["photos"])
    assert not set(train["seeds"]) & set(test["seeds"])


def test_samples_are_photo_like_and_depend_on_seed_world_and_index():
    image, depth = render_sample(0, "train", 3, 64, 48)
    assert image.shape == (48, 64, 3) and depth.shape == (48, 64) and depth.dtype == np.float32
    assert image.std() > 10 and 0.3 < (depth > 0).mean() <= 1.0 and depth.max() < MAX_DEPTH
    again, _ = render_sample(0, "train", 3, 64, 48)
    assert np.array_equal(image, again)
    for other in (render_sample(1, "train", 3, 64, 48), render_sample(0, "test", 3, 64, 48),
                  render_sample(0, "train", 4, 64, 48)):
        assert not np.array_equal(image, other[0])


def files_of(folder):
    return {path.relative_to(folder): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_one_or_two_processes_write_the_same_bytes_and_a_rerun_adds_only_whats_missing(tmp_path, capsys):
    args = ["--count", "4", "--size", "40x32", "--seed", "5", "--world", "test"]
    assert main(["--out", str(tmp_path / "one"), "--workers", "1", *args]) == 0
    assert main(["--out", str(tmp_path / "two"), "--workers", "2", *args]) == 0
    one, two = files_of(tmp_path / "one"), files_of(tmp_path / "two")
    assert len([name for name in one if name.parts[0] == "images"]) == 4 and one == two
    depth = np.load(tmp_path / "one" / "depth" / "000002.npy")
    mask = np.asarray(Image.open(tmp_path / "one" / "mask" / "000002.png"))
    assert np.array_equal(mask == 255, depth > 0)
    capsys.readouterr()
    assert main(["--out", str(tmp_path / "one"), "--workers", "1", "--count", "6", *args[2:]]) == 0
    assert "wrote 2 samples" in capsys.readouterr().out
    assert files_of(tmp_path / "one").items() >= one.items()


def test_a_folder_of_other_files_or_other_settings_is_refused_untouched(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep\n")
    assert main(["--out", str(mine), "--count", "1", "--size", "16x16"]) == 1
    assert capsys.readouterr().err.startswith("error: ") and (mine / "notes.txt").read_text() == "keep\n"
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    world = tmp_path / "world"
    assert main(["--out", str(world), "--count", "1", "--size", "16x16", "--workers", "1"]) == 0
    before = files_of(world)
    assert main(["--out", str(world), "--count", "1", "--size", "16x16", "--seed", "9"]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "other settings (seed)" in error and files_of(world) == before
    with pytest.raises(SystemExit) as exit_code:
        main(["--out", str(world), "--count", "1", "--size", "16by16"])
    assert exit_code.value.code == 1 and "give WIDTHxHEIGHT" in capsys.readouterr().err


def test_world_json_records_the_range_every_mask_uses(tmp_path):
    import json
    from dataclasses import asdict

    assert main(["--out", str(tmp_path / "w"), "--count", "1", "--size", "16x16", "--workers", "1"]) == 0
    spec = json.loads((tmp_path / "w" / "world.json").read_text())
    assert spec == asdict(WorldSpec("train", 0, 16, 16))


def test_a_shape_casts_its_shadow_straight_down_under_a_sun_overhead():
    """Sun at the zenith, no haze: the ground under a floating sphere gets ambient light only,
    exactly inside the disc below it (radius r), and the full sun outside."""
    camera = Camera(height=3.0, pitch=math.radians(60), roll=0.0, hfov=math.radians(60), width=64, height_px=64)
    centre, radius = np.array([0.4, 1.0, 2.0]), 0.4
    scene = Scene(camera=camera, surfaces=(Surface("ground", (), 0, 1.0, (0.0, 0.0)),
                                           shape("sphere", *centre, radius)),
                  sun=(0.0, 1.0, 0.0), sun_strength=0.8, ambient=0.2, haze=0.0, haze_colour=(0.0, 0.0, 0.0),
                  sky=((0.7, 0.7, 0.8), (0.2, 0.3, 0.7)))
    image, depth = render(scene, GREY)
    origin, directions = camera.rays()
    points = origin.numpy() + depth.reshape(-1, 1) * directions.numpy()
    on_ground = np.abs(points[:, 1]) < 1e-3
    from_axis = np.hypot(points[:, 0] - centre[0], points[:, 2] - centre[2])
    brightness = image.reshape(-1, 3).mean(1)
    shadow = brightness[on_ground & (from_axis < radius - 0.03)]
    lit = brightness[on_ground & (from_axis > radius + 0.03)]
    assert shadow.size > 20 and lit.size > 20
    # Linear light 0.25 x 0.2 in the shadow and 0.25 x 1.0 outside, then gamma 2: 255 * sqrt(...).
    assert np.allclose(shadow, 255 * math.sqrt(0.25 * 0.2), atol=1) and np.allclose(lit, 255 * math.sqrt(0.25), atol=1)
