"""Saved student folders: what config.json records, old folders, and `load_student`'s one-line
errors for every way a folder can be broken."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from modeling import StudentDepthModel, StudentLoadError, load_student

CUSTOM_MEAN, CUSTOM_STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


@pytest.fixture(scope="module")
def saved(student, tmp_path_factory) -> Path:
    """The shared tiny student, saved with a recorded input size and a non-default normalisation."""
    model = StudentDepthModel(decoder_width=16, head_width=8, input_size=64, image_mean=CUSTOM_MEAN,
                              image_std=CUSTOM_STD)
    model.load_state_dict(student.state_dict())
    folder = tmp_path_factory.mktemp("saved") / "student_best"
    model.save_pretrained(folder)
    return folder


def _copy(saved: Path, tmp_path: Path, config: object = None, weights: bytes | None = None) -> Path:
    """A copy of `saved` with config.json replaced by `config` (dict, or str written as is) and
    model.safetensors by `weights`, where given."""
    folder = tmp_path / "student"
    shutil.copytree(saved, folder)
    if config is not None:
        text = config if isinstance(config, str) else json.dumps(config)
        (folder / "config.json").write_text(text)
    if weights is not None:
        (folder / "model.safetensors").write_bytes(weights)
    return folder


def _load_error(path: Path) -> str:
    with pytest.raises(StudentLoadError) as caught:
        load_student(path)
    message = str(caught.value)
    assert "\n" not in message and message.strip() == message
    return message


def test_config_records_input_size_and_normalisation(saved, student):
    config = json.loads((saved / "config.json").read_text())
    assert config == {"backbone": "mobilevit_xs", "decoder": "lean", "decoder_width": 16, "head_width": 8,
                      "input_size": 64, "image_mean": CUSTOM_MEAN, "image_std": CUSTOM_STD}
    loaded = load_student(saved)
    assert (loaded.input_size, loaded.image_mean, loaded.image_std) == (64, CUSTOM_MEAN, CUSTOM_STD)
    assert not loaded.training
    images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(images), student(images))


def test_build_records_input_size(tmp_path):
    model = StudentDepthModel.build(decoder_width=16, head_width=8, input_size=128)
    model.save_pretrained(tmp_path)
    assert model.input_size == 128 and json.loads((tmp_path / "config.json").read_text())["input_size"] == 128


def test_old_config_without_the_new_keys_loads_with_defaults(tmp_path):
    """Folders saved before input_size, the normalisation and decoder names were recorded: a
    MiniDPT with its widths only."""
    torch.manual_seed(0)
    old = StudentDepthModel(decoder="dpt", decoder_width=16, head_width=8).eval()
    old.save_pretrained(tmp_path / "student")
    (tmp_path / "student" / "config.json").write_text(
        json.dumps({"backbone": "mobilevit_xs", "decoder_width": 16, "head_width": 8}))
    loaded = load_student(tmp_path / "student")
    images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert type(loaded.decoder).__name__ == "MiniDPT" and torch.equal(loaded(images), old(images))
    assert loaded.input_size is None
    assert loaded.image_mean == [0.485, 0.456, 0.406] and loaded.image_std == [0.229, 0.224, 0.225]


def test_unknown_config_keys_are_ignored(saved, tmp_path):
    config = {**json.loads((saved / "config.json").read_text()), "written_by": "a later version"}
    assert load_student(_copy(saved, tmp_path, config=config)).input_size == 64


def test_missing_path(tmp_path):
    # A bare name must not be taken for a hub id (from_pretrained would try the network).
    assert _load_error(tmp_path / "student_best").endswith("does not exist; pass a folder written by training, "
                                                           "e.g. runs/<run_name>/student_best")


def test_a_file_is_not_a_folder(saved):
    assert "is a file, not a student folder" in _load_error(saved / "model.safetensors")


def test_folder_without_config(tmp_path):
    assert _load_error(tmp_path) == (f"{tmp_path} is not a student folder (no config.json); pass a folder "
                                     f"written by training, e.g. runs/<run_name>/student_best")


@pytest.mark.parametrize("text, expected", [("{not json", "is not valid JSON (JSONDecodeError"),
                                            ("[1, 2]", "holds list, not a student config"),
                                            ('{"decoder_width": "wide"}', "does not describe a student")])
def test_bad_config(saved, tmp_path, text, expected):
    message = _load_error(_copy(saved, tmp_path, config=text))
    assert "config.json" in message and expected in message


def test_unknown_backbone_in_config(saved, tmp_path):
    config = {**json.loads((saved / "config.json").read_text()), "backbone": "mobilevit_zz"}
    message = _load_error(_copy(saved, tmp_path, config=config))
    assert "config.json" in message and "timm does not know the student backbone 'mobilevit_zz'" in message
    assert "similar names: mobilevit" in message


def test_missing_weights(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    (folder / "model.safetensors").unlink()
    assert "has config.json but no model.safetensors" in _load_error(folder)


@pytest.mark.parametrize("damage", ["empty", "garbage", "truncated", "truncated_header"])
def test_corrupt_weights(saved, tmp_path, damage):
    good = (saved / "model.safetensors").read_bytes()
    weights = {"empty": b"", "garbage": b"\x00" * 64 + b"not safetensors", "truncated": good[:len(good) // 2],
               "truncated_header": good[:40]}[damage]
    folder = _copy(saved, tmp_path, weights=weights)
    message = _load_error(folder)
    assert message.startswith(f"{folder / 'model.safetensors'} is corrupt or truncated (")


def test_weights_of_another_architecture(saved, tmp_path):
    config = {**json.loads((saved / "config.json").read_text()), "decoder_width": 32}
    message = _load_error(_copy(saved, tmp_path, config=config))
    assert "model.safetensors does not match config.json" in message


def test_tagged_timm_name_is_accepted():
    # timm.list_models() holds architecture names only; 'name.tag' is valid for create_model.
    model = StudentDepthModel(backbone="mobilevit_xs.cvnets_in1k", decoder_width=16, head_width=8)
    assert model.feature_channels == [48, 64, 80, 384]


def test_unknown_tag_is_one_line():
    with pytest.raises(StudentLoadError, match=r"no weights tagged 'bogus' for student backbone 'mobilevit_xs'; "
                                               r"tagged names: mobilevit_xs\.cvnets_in1k$"):
        StudentDepthModel(backbone="mobilevit_xs.bogus", decoder_width=16, head_width=8)


def test_the_folder_readme_does_not_claim_a_hub_upload(tmp_path):
    """The mixin's default model card says the model 'has been pushed to the Hub'."""
    StudentDepthModel(decoder_width=8, head_width=8, input_size=64).save_pretrained(tmp_path / "student")
    card = (tmp_path / "student" / "README.md").read_text()
    assert "pushed to the Hub" not in card and "load_student" in card
