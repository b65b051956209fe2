"""bench.quality: the headline ratio, the picture's single colour scale, the --tiny verdict, and the
--tiny run itself (distillation must beat a misaligned control)."""

import dataclasses
import json

import pytest
import torch
from PIL import Image

from bench import quality
from tests.warm import run_warm
from trainer.evaluate.visualize import depth_comparison_picture


def test_share_of_gain():
    assert quality.share_of_gain(prior=0.3, teacher=0.2, student=0.22) == pytest.approx(0.8)
    assert quality.share_of_gain(prior=0.5, teacher=0.7, student=0.5) == pytest.approx(0.0)  # delta1 rises
    assert quality.share_of_gain(prior=0.3, teacher=0.2, student=0.35) < 0


def test_comparison_picture_puts_every_map_on_one_scale():
    """One colour scale for all maps: a map ten times the ground truth looks different from it
    (per-map stretching, as TensorBoard's grids do, would make the two tiles identical)."""
    truth = torch.linspace(0, 2, 256).view(16, 16)

    def tiles(student):
        picture = depth_comparison_picture([torch.rand(3, 16, 16)], {"ground truth": [truth], "student": [student]})
        width = picture.shape[2] // 3
        body = picture[:, 18:18 + 192]  # under the titles: the 16 px row enlarged to 192
        return body[:, :, width:2 * width], body[:, :, 2 * width:]

    same_truth, same_student = tiles(truth.clone())
    assert torch.equal(same_truth, same_student)
    scaled_truth, scaled_student = tiles(truth * 10)
    assert not torch.equal(scaled_truth, scaled_student)


def test_distillation_check_names_each_shortfall():
    """The --tiny verdict, on made-up results: a control as good as the student fails it on both
    measures; a student that leads by the required margins passes."""
    def rows(distilled, control):
        untrained = {"gt_abs_rel": 0.5, "teacher_delta1": 0.3}
        return {quality.TINY_ROWS[0].name: untrained, quality.TINY_DISTILLED.name: distilled,
                quality.TINY_CONTROL.name: control}

    student = {"gt_abs_rel": 0.27, "teacher_delta1": 0.84}
    assert quality.distillation_failures(rows(student, {"gt_abs_rel": 0.29, "teacher_delta1": 0.82})) == []
    failures = quality.distillation_failures(rows(student, dict(student)))
    assert [failure.split(":")[0] for failure in failures] == ["gt_abs_rel", "teacher_delta1"]
    assert all(quality.TINY_CONTROL.name in failure for failure in failures)


def test_a_finished_student_is_reused_only_for_the_same_command_code_and_teacher(tmp_path, monkeypatch):
    """A rerun (after a crash, or --ablations after the headline run) skips the students an earlier
    run finished with the same command, training code and teacher; a killed run's student is trained anew."""
    student = tmp_path / "runs" / "row" / "student_last"
    training = quality.Training(quality.DEFAULT, ["python", "trainer/main.py", "a=1"], tmp_path / "row.log", student,
                                {"command": ["trainer/main.py", "a=1"], "training_code": "c1", "teacher": "t1"})
    launched = []

    def launch(command, log, env):
        launched.append(command)
        student.mkdir(parents=True, exist_ok=True)
        log.write_text("error: out of memory\n" if len(launched) == 1 else "")
        return 0 if len(launched) > 1 else 1  # the first run fails: no record

    monkeypatch.setattr(quality, "launch", launch)
    failed = r"training 'student \(default recipe\)' failed \(exit 1\): error: out of memory"
    with pytest.raises(quality.RunError, match=failed):
        quality.train_students([training], jobs=1, threads=None)
    assert student.is_dir() and not training.finished_before()  # what a killed or failed run leaves
    quality.train_students([training], jobs=1, threads=None)
    assert len(launched) == 2 and json.loads(training.record.read_text()) == training.provenance
    quality.train_students([training], jobs=1, threads=None)
    assert len(launched) == 2  # reused
    for key, other in (("command", ["trainer/main.py", "a=2"]), ("training_code", "c2"), ("teacher", "t2")):
        assert not dataclasses.replace(training, provenance={**training.provenance, key: other}).finished_before()


def test_the_training_code_fingerprint_follows_the_code_and_nothing_else(tmp_path):
    for package in quality.TRAINING_CODE:
        (tmp_path / package).mkdir()
    (tmp_path / "data" / "datasets.py").write_text("x = 1\n")
    (tmp_path / "trainer" / "world.yaml").write_text("a: 1\n")
    before = quality.training_code(tmp_path)
    (tmp_path / "trainer" / "notes.md").write_text("docs\n")
    (tmp_path / "README.md").write_text("docs\n")
    assert quality.training_code(tmp_path) == before
    (tmp_path / "trainer" / "world.yaml").write_text("a: 2\n")
    assert quality.training_code(tmp_path) != before


def _warm_launch(command: list[str], log, env) -> int:
    """quality.launch's commands (`python trainer/main.py ...`, `python -m MODULE ...`) in warm
    processes (tests/warm.py): the same code and arguments, without a new interpreter's imports."""
    _, *args = command
    module, argv = ("trainer.main", args[1:]) if args[0] == "trainer/main.py" else (args[1], args[2:])
    result = run_warm(module, argv, env)
    log.write_text(result.stdout + result.stderr)
    return result.returncode


def test_tiny_run_shows_that_distillation_transfers_what_the_teacher_sees(tmp_path, monkeypatch):
    """`python -m bench.quality --tiny` end to end (about 65 s on 2 cores): the worlds rendered, the
    shipped teacher cached by the trainer's cache writer, two students trained side by side by
    trainer/main.py (128 steps of 8 at 64 px), scored on 128 test scenes.

    The distilled student's lead over the flipped control, seeds 0 / 1 / 2, on a 2-core AVX-512
    machine (students on one thread each): ground-truth AbsRel 0.015 / 0.030 / 0.014, delta1 against
    the teacher 0.018 / 0.020 / 0.017 (over the student before training: > 0.2 and > 0.5). With the
    trainer's flip of the cached maps removed (`crop_map` ignoring `flip`, so half the targets are
    mirrored against their photo) the leads fell to 0.0005 / -0.002 and 0.0015 / -0.001 (seeds 0 / 1)
    and this test failed: MIN_LEAD asks 0.007 and 0.009, halfway between. At the earlier 64 steps
    and 32 test scenes the delta1 lead swung from 0.009 to 0.029 with the seed and the machine, and
    fell short on correct code. A crop misalignment (`crop_map` ignoring the crop) is too small for
    students this short to feel: test_teacher_cache's exact crop tests fail on it.
    """
    monkeypatch.setattr(quality, "launch", _warm_launch)
    assert quality.main(["--tiny", "--work", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "quality.json").read_text())
    results = report["results"]
    distilled = results[quality.TINY_DISTILLED.name]
    for other in (quality.TINY_ROWS[0].name, quality.TINY_CONTROL.name):
        for metric, needed in quality.MIN_LEAD.items():
            assert quality.lead(metric, distilled[metric], results[other][metric]) >= needed, (other, metric)
    assert report["check"]["failures"] == []
    table = (tmp_path / "quality.md").read_text()
    assert all(name in table for name in ("layout prior", "teacher", quality.TINY_CONTROL.name))
    picture = Image.open(tmp_path / "quality.png")
    assert picture.width > 4 * 64 and picture.height > 3 * 64  # 3 scenes x (image, truth, teacher, student)
