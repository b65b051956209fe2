"""The world teacher (bench/world_teacher): its shipped weights load like a hub teacher and know the
held-out test world's depth, and the command that made them is deterministic and resumes exactly."""

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch

from bench import quality, world_teacher
from data.synthetic import render_sample
from data.transforms import IMAGENET_MEAN, IMAGENET_STD
from modeling import DepthAnythingTeacher
from trainer.evaluate.metrics import depth_metrics, disparity_to_depth

SIZE = world_teacher.INPUT_SIZE


def _scores(disparity: torch.Tensor, depth: np.ndarray) -> tuple[float, float]:
    """AbsRel and delta1 after scale-and-shift alignment in disparity (the benchmark's protocol)."""
    target = torch.from_numpy(depth)[None, None]
    valid = target > 0
    metrics = depth_metrics(disparity_to_depth(disparity.view_as(target)), target, valid, align="scale_shift",
                            max_depth=40.0, min_depth=0.1)
    return float(metrics["abs_rel"][0]), float(metrics["delta1"][0])


def test_shipped_teacher_loads_like_a_hub_teacher():
    teacher = DepthAnythingTeacher.from_pretrained(str(world_teacher.SHIPPED))
    assert teacher.dtype == torch.float32  # float16 on disk, float32 in memory
    expected = world_teacher.world_teacher_config().backbone_config
    loaded = teacher.model.config.backbone_config
    assert (loaded.hidden_size, loaded.num_hidden_layers, list(loaded.out_indices)) == \
        (expected.hidden_size, expected.num_hidden_layers, list(expected.out_indices))
    assert (world_teacher.SHIPPED / "model.safetensors").stat().st_size < 5 * 2**20
    recipe = json.loads((world_teacher.SHIPPED / "recipe.json").read_text())
    made_with = recipe.pop("made_with")
    assert recipe == asdict(world_teacher.Recipe())  # the command's defaults reproduce it
    assert set(made_with) == {"torch", "transformers"}
    assert json.loads((world_teacher.SHIPPED / "config.json").read_text())["dtype"] == "float32"


def test_shipped_teacher_knows_the_test_worlds_depth():
    """On 12 test scenes (textures and layouts it never saw), the teacher is far better than the
    layout prior: the per-pixel mean disparity of 64 train scenes, what a model knows without
    looking. Measured (torch 2.14.1, transformers 5.25.0): teacher AbsRel 0.196, delta1 0.710;
    prior 0.299, 0.567 (asserted: AbsRel below 0.8x the prior's, delta1 above it by 0.08)."""
    prior = quality.layout_prior(render_sample(0, "train", i, SIZE, SIZE)[1] for i in range(64))
    teacher = DepthAnythingTeacher.from_pretrained(str(world_teacher.SHIPPED))
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    teacher_scores, prior_scores = [], []
    for index in range(12):
        image, depth = render_sample(0, "test", index, SIZE, SIZE)
        pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
        disparity = teacher((pixels - mean) / std).disparity
        teacher_scores.append(_scores(disparity, depth))
        prior_scores.append(_scores(prior, depth))
    teacher_abs_rel, teacher_delta1 = np.mean(teacher_scores, axis=0)
    prior_abs_rel, prior_delta1 = np.mean(prior_scores, axis=0)
    assert teacher_abs_rel < 0.8 * prior_abs_rel
    assert teacher_delta1 > prior_delta1 + 0.08


def _tiny_recipe(**changes) -> world_teacher.Recipe:
    return world_teacher.Recipe(**{"steps": 3, "batch_size": 2, "size": 42, "warmup_steps": 1, "threads": 1,
                                   **changes})


def _weights(model) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def test_training_is_deterministic_and_resumes_to_the_same_weights(tmp_path, monkeypatch):
    recipe = _tiny_recipe()
    straight = _weights(world_teacher.train(tmp_path / "straight", recipe, save_every=2, workers=0))
    assert not (tmp_path / "straight" / "checkpoint.pt.partial").exists()

    # A crash right after the checkpoint at step 2, then the same command again.
    real_save = world_teacher._save_checkpoint

    def save_then_crash(path, model, optimizer, step, recipe):
        real_save(path, model, optimizer, step, recipe)
        raise KeyboardInterrupt

    monkeypatch.setattr(world_teacher, "_save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        world_teacher.train(tmp_path / "resumed", recipe, save_every=2, workers=0)
    monkeypatch.setattr(world_teacher, "_save_checkpoint", real_save)
    assert torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)["step"] == 2
    resumed = _weights(world_teacher.train(tmp_path / "resumed", recipe, save_every=2, workers=0))
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)

    other_seed = _weights(world_teacher.train(tmp_path / "other", _tiny_recipe(seed=1), save_every=2, workers=0))
    assert not all(torch.equal(straight[name], other_seed[name]) for name in straight)


def test_a_checkpoint_of_another_recipe_is_refused(tmp_path):
    world_teacher.train(tmp_path, _tiny_recipe(steps=1), save_every=1, workers=0)
    with pytest.raises(SystemExit, match="another recipe"):
        world_teacher.train(tmp_path, _tiny_recipe(steps=2), save_every=1, workers=0)


def test_the_command_refuses_a_folder_of_other_files(tmp_path, capsys):
    mine = tmp_path / "notes.txt"
    mine.write_text("keep me")
    with pytest.raises(SystemExit) as stopped:
        world_teacher.main(["--out", str(tmp_path), "--steps", "1"])
    assert stopped.value.code == 1
    assert "did not write (notes.txt)" in capsys.readouterr().err
    assert mine.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_the_target_is_disparity_with_the_sky_at_zero():
    image, target = world_teacher.RenderedWorld(0, 42)[5]
    _, depth = render_sample(0, "train", 5, 42, 42)
    assert image.shape == (3, 42, 42) and target.shape == (1, 42, 42)
    sky = depth == 0
    assert sky.any() and (target[0][torch.from_numpy(sky)] == 0).all()
    assert torch.allclose(target[0][torch.from_numpy(~sky)], torch.from_numpy(1 / depth[~sky]))


def test_learning_rate_warms_up_then_decays_to_zero():
    recipe = world_teacher.Recipe(steps=100, warmup_steps=10, lr=1e-3)
    assert world_teacher.learning_rate(recipe, 0) == pytest.approx(1e-4)
    assert world_teacher.learning_rate(recipe, 9) == pytest.approx(1e-3)
    assert world_teacher.learning_rate(recipe, 55) == pytest.approx(5e-4)
    assert world_teacher.learning_rate(recipe, 100) == pytest.approx(0, abs=1e-12)
