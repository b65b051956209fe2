"""trainer/config.py: defaults < YAML < dotted overrides, validation messages, and the CLI's
refusal of a bad configuration before any model is built."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from conftest import REPO
from trainer.config import Config, ConfigError, LossWeights, flat_hparams, load_config, to_yaml

DEMO = REPO / "trainer" / "configs" / "demo.yaml"
DAV2_SMALL = REPO / "trainer" / "configs" / "dav2_small_mobilevit_xs.yaml"


def test_defaults_and_run_dir():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg == Config()
    assert cfg.run_dir == Path("runs/distill")
    assert load_config(overrides=["run_name=x"]).run_dir == Path("runs/x")
    assert load_config(overrides=["output_dir=/tmp/elsewhere"]).run_dir == Path("/tmp/elsewhere")


def test_shipped_presets_load():
    demo = load_config(DEMO)
    assert demo.teacher.name == "tiny"
    assert demo.student.pretrained is False
    assert (demo.data.teacher_size, demo.data.student_size) == (126, 128)
    assert demo.run_dir == Path("runs/demo")

    real = load_config(DAV2_SMALL)
    assert real.teacher.name == "depth-anything/Depth-Anything-V2-Small-hf"
    assert (real.data.teacher_size, real.data.student_size) == (518, 256)
    assert real.train.mixed_precision == "bf16"
    assert real.run_dir == Path("runs/dav2s_mvitxs")


def test_overrides_are_typed():
    cfg = load_config(overrides=["optim.lr=3e-4", "data.train_dir=photos/", "train.max_steps=7",
                                 "distill.weights.feature=0", "data.crop_scale=[0.3,1.0]"])
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == 3e-4
    assert cfg.data.train_dir == "photos/"
    assert isinstance(cfg.train.max_steps, int) and cfg.train.max_steps == 7
    assert isinstance(cfg.distill.weights.feature, float) and cfg.distill.weights.feature == 0.0
    assert cfg.data.crop_scale == [0.3, 1.0]


def test_cli_beats_yaml_beats_defaults():
    from_yaml = load_config(DEMO)
    assert from_yaml.optim.lr == 1e-3  # demo.yaml
    assert from_yaml.optim.weight_decay == 0.01  # not in demo.yaml: the default
    from_cli = load_config(DEMO, ["optim.lr=3e-4", "train.batch_size=5"])
    assert from_cli.optim.lr == 3e-4
    assert from_cli.train.batch_size == 5
    assert from_cli.train.epochs == 8  # untouched YAML value survives


@pytest.mark.parametrize("override, expected", [
    ("optim.lrr=1", ["'optim.lrr'", "lr, encoder_lr_mult"]),
    ("foo.bar=1", ["'foo'", "optim"]),
    ("train.batch_size=abc", ["'train.batch_size'", "abc"]),
    ("optim.lr=-1", ["'optim.lr'", "> 0"]),
    ("data.teacher_size=384", ["'data.teacher_size'", "multiple of 14", "378 or 392"]),
    ("data.student_size=250", ["'data.student_size'", "multiple of 32", "224 or 256"]),
    ("distill.normalization=zscore", ["'distill.normalization'", "zscore", "median_mad"]),
    ("eval.best_metric=foo", ["'eval.best_metric'", "abs_rel"]),
    ("eval.align=foo", ["'eval.align'", "scale_shift"]),
    ("student.decoder=unet", ["'student.decoder'", "'unet' is not one of lean, dpt"]),
    ("student.decoder_width=0", ["'student.decoder_width'", "must be > 0 (or null"]),
    ("optim.lr", ["optim.lr", "section.key=value"]),
])
def test_bad_overrides_are_rejected_naming_the_key(override, expected):
    with pytest.raises(ConfigError) as caught:
        load_config(overrides=[override])
    message = str(caught.value)
    assert "\n" not in message
    for fragment in expected:
        assert fragment in message


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_yaml_with_unknown_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  lrr: 1.0\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert "'optim.lrr'" in str(caught.value)
    assert "bad.yaml" in str(caught.value)


def test_the_weight_keys_are_the_loss_terms():
    import losses

    assert losses.LOSS_TERMS == tuple(f.name for f in dataclasses.fields(LossWeights))


def test_flat_hparams_are_scalars_under_dotted_keys():
    flat = flat_hparams(load_config(DEMO))
    assert all(isinstance(v, (int, float, str, bool)) for v in flat.values())
    assert flat["optim.lr"] == 1e-3
    assert flat["distill.weights.feature"] == 0.1
    assert flat["student.pretrained"] is False
    assert flat["data.crop_scale"] == "[0.5, 1.0]"  # lists become strings
    assert flat["output_dir"] == "None"
    assert "optim" not in flat and "distill.weights" not in flat  # only leaves


def test_to_yaml_round_trips(tmp_path):
    cfg = load_config(DEMO, ["optim.lr=3e-4", "data.crop_scale=[0.3,1.0]", "teacher.feature_layers=[1,2,3,4]",
                             "train.max_steps=7", "output_dir=somewhere"])
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(path) == cfg


def _fail_if_called(*args, **kwargs):
    raise AssertionError("a model was built before the configuration was checked")


@pytest.fixture
def cli(monkeypatch, tmp_path, capsys):
    """Runs `trainer.main.main` in an empty folder; building the student fails the test, and so
    does building the teacher unless the call allows it."""
    import trainer.main
    import trainer.train.run

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(trainer.train.run, "build_student", _fail_if_called)
    build_teacher = trainer.train.run.build_teacher

    def run(*overrides: str, teacher_allowed: bool = False) -> tuple[int, str]:
        monkeypatch.setattr(trainer.train.run, "build_teacher", build_teacher if teacher_allowed else _fail_if_called)
        code = trainer.main.main(["--config", str(DEMO), f"output_dir={tmp_path / 'run'}", *overrides])
        return code, capsys.readouterr().err

    return run


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error:")
    return lines[0]


def test_cli_rejects_unknown_key(cli):
    code, err = cli("optim.lrr=1")
    assert code == 1
    assert "optim.lrr" in _one_error_line(err)


def test_cli_rejects_missing_train_dir(cli, tmp_path):
    code, err = cli(f"data.train_dir={tmp_path / 'missing'}")
    assert code == 1
    line = _one_error_line(err)
    assert "data.train_dir" in line and "does not exist" in line


def test_cli_rejects_empty_train_dir(cli, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = cli(f"data.train_dir={empty}")
    assert code == 1
    assert "no images" in _one_error_line(err)


def test_a_run_saved_before_decoders_had_names_resumes_as_minidpt(tmp_path):
    from trainer.config import resume_config

    saved = tmp_path / "config.yaml"
    saved.write_text(DEMO.read_text().replace("  decoder: lean", "  decoder_width: 32\n  head_width: 16"))
    assert "decoder:" not in saved.read_text()
    cfg, changes, _ = resume_config(saved, ["train.epochs=9"])
    assert (cfg.student.decoder, cfg.student.decoder_width, cfg.student.head_width) == ("dpt", 32, 16)
    assert changes == ["train.epochs: 8 -> 9"]  # the implied decoder is not a change the user made
    current = tmp_path / "current.yaml"
    current.write_text(DEMO.read_text())
    assert resume_config(current, [])[0].student.decoder == "lean"
