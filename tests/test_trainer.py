"""The trainer run for real on tiny models and images: `trainer/main.py`'s main in a process of its
own per run (each owns its process-wide Accelerate state), one per rank for a 2-process run. The
processes are warm (tests/warm.py): forked with the libraries already imported. The launchers
themselves are tested in test_cli.py and test_launch.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.launching import launch_env
from tests.warm import run_warm
from trainer.train.run_dir import RUN_MARKER

REPO = Path(__file__).resolve().parents[1]

DEMO = str(REPO / "trainer" / "configs" / "demo.yaml")
# Small enough for seconds per run on 2 cores, big enough for every stage of the student.
TINY = ["data.teacher_size=70", "data.student_size=64", "train.batch_size=2", "data.num_workers=0",
        "eval.batch_size=2", "log.log_every=1", "log.image_every=2", "train.deterministic=true"]


def run_trainer(args: list[str], processes: int = 1, fault: str | None = None,
                check: bool = True) -> subprocess.CompletedProcess:
    """`python trainer/main.py ARGS` on one process, or the ranks of `accelerate launch` on more, as
    warm processes (tests/warm.py); `fault` sets DEPTH_DISTILL_FAULT (trainer/train/faults.py)."""
    env = launch_env()
    env.pop("DEPTH_DISTILL_FAULT", None)
    if fault:
        env["DEPTH_DISTILL_FAULT"] = fault
    result = run_warm("trainer.main", args, env, processes)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


def tiny_run_args(output_dir: Path, photos: Path, *extra: str) -> list[str]:
    return ["--config", DEMO, f"output_dir={output_dir}", f"data.train_dir={photos}", *TINY, *extra]


def scalar_events(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events: dict[str, list[tuple[int, float]]] = {}
    for file in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(file), size_guidance={"scalars": 0, "images": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            events.setdefault(tag, []).extend((e.step, e.value) for e in accumulator.Scalars(tag))
        for tag in accumulator.Tags()["images"]:
            events.setdefault(tag, []).extend((e.step, 0.0) for e in accumulator.Images(tag))
    return events


def hparams_metrics(run_dir: Path) -> list[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    (file,) = (run_dir / "tensorboard").glob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(file))
    accumulator.Reload()
    content = accumulator.PluginTagToContent("hparams")["_hparams_/experiment"]
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content).experiment
    return [info.name.tag for info in experiment.metric_infos]


def make_labeled_set(root: Path, count: int = 3) -> Path:
    """Photos with a made-up metric depth (a left-to-right ramp, 1..5 m) as .npy ground truth."""
    from PIL import Image

    (root / "images").mkdir(parents=True)
    (root / "depth").mkdir()
    for i, photo in enumerate(sorted((REPO / "data" / "samples").glob("*.jpg"))[:count]):
        Image.open(photo).convert("RGB").resize((48, 40)).save(root / "images" / f"{i}.png")
        np.save(root / "depth" / f"{i}.npy", np.tile(np.linspace(1.0, 5.0, 48, dtype=np.float32), (40, 1)))
    return root


def test_end_to_end_run(tmp_path, photo_dir):
    run_dir = tmp_path / "run"
    labeled = make_labeled_set(tmp_path / "labeled")
    (photo_dir / "notes.txt").write_text("not a photo")
    result = run_trainer(tiny_run_args(run_dir, photo_dir, "train.max_steps=4", "train.save_every=2", "eval.every=2",
                                       f"data.labeled_dir={labeled}"))
    summary = result.stdout.splitlines()
    assert summary[1] == f"  photos: 3 for training from {photo_dir}, 1 for validation (25% of them, seed 0)"
    assert summary[2] == "  ignored (not a photo format this trainer reads): 1 .txt"

    assert (run_dir / "config.yaml").is_file()
    for name in ("student_best", "student_last"):
        assert {"config.json", "model.safetensors"} <= {p.name for p in (run_dir / name).iterdir()}
    states = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert states == ["step_00000002", "step_00000004"]

    events = scalar_events(run_dir)
    for tag in ("train/loss", "train/ssi", "train/gradient_weighted", "train/feature", "train/grad_norm",
                "train/images_per_s", "lr/decoder", "lr/encoder", "lr/adapters", "val_teacher/abs_rel",
                "val_teacher/delta1", "val_gt/abs_rel", "val_gt/num_images", "samples/input_teacher_student_error"):
        assert tag in events, f"missing TensorBoard tag {tag}; have {sorted(events)}"
    assert [step for step, _ in events["train/loss"]] == [1, 2, 3, 4]
    assert all(value == 3 for _, value in events["val_gt/num_images"])

    # HParams sit in the run's own event file with the metrics they are compared by (Accelerate's
    # own hparams call wrote a second run folder named by a timestamp).
    assert not [p for p in (run_dir / "tensorboard").iterdir() if p.is_dir()]
    assert "best/abs_rel" in events and "val_gt/abs_rel" in hparams_metrics(run_dir)
    # The student records the size it was trained at, for predict/export/evaluate to default to.
    assert json.loads((run_dir / "student_best" / "config.json").read_text())["input_size"] == 64

    report = json.loads((run_dir / "student.onnx.json").read_text())
    assert report["max_abs_diff_vs_pytorch"] < 1e-4
    assert report["export_size"] == [64, 64] and report["dynamic_batch"]

    # The exported file and the from_pretrained student give the same depth.
    import onnxruntime as ort

    from modeling import StudentDepthModel

    student = StudentDepthModel.from_pretrained(str(run_dir / "student_best")).eval()
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        expected = student(images).numpy()
    session = ort.InferenceSession(str(run_dir / "student.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"image": images.numpy()})[0], expected, atol=1e-4)
    # The deploy artifact is the student alone: no adapter weights in it.
    assert not any("criterion" in key or "adapter" in key
                   for key in load_file(run_dir / "student_best" / "model.safetensors"))


def test_refuses_a_folder_holding_another_run(tmp_path, photo_dir, capsys):
    from trainer.main import main

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("run_name: other\n")
    (run_dir / RUN_MARKER).write_text("{}\n")
    assert main(tiny_run_args(run_dir, photo_dir)) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("error:") and "--resume latest" in error and "--overwrite" in error
    assert len(error.splitlines()) == 1


def test_resume_without_a_state_is_a_clear_error(tmp_path, photo_dir, capsys):
    from trainer.main import main

    from trainer.config import load_config, to_yaml

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    args = tiny_run_args(run_dir, photo_dir)
    (run_dir / "config.yaml").write_text(to_yaml(load_config(DEMO, args[2:])))
    (run_dir / RUN_MARKER).write_text("{}\n")
    assert main(args + ["--resume", "latest"]) == 1
    assert "no complete training state" in capsys.readouterr().err


def final_student(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "student_last" / "model.safetensors")


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference: 10 steps (3 photos for training at batch 2 -> 2 steps an epoch, so the run
    crosses several epochs and the kills below land mid-epoch)."""
    root = tmp_path_factory.mktemp("reference")
    photos = root / "photos"
    photos.mkdir()
    for path in sorted((REPO / "data" / "samples").glob("*.jpg"))[:4]:
        (photos / path.name).write_bytes(path.read_bytes())
    run_dir = root / "run"
    run_trainer(tiny_run_args(run_dir, photos, "train.max_steps=10", "train.save_every=3"))
    return photos, run_dir


# The tests that compare with `uninterrupted` run on one pytest-xdist worker, which trains it once.
SHARES_THE_REFERENCE = pytest.mark.xdist_group("uninterrupted_reference")


def make_shards(out: Path, photos: Path, *overrides: str) -> Path:
    """The photos as shards, as `python -m trainer.prepare_shards` writes them for a tiny run."""
    result = run_warm("trainer.prepare_shards", ["--config", DEMO, "--out", str(out), f"data.train_dir={photos}",
                                                 *TINY, *overrides])
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def uninterrupted_from_shards(tmp_path_factory, uninterrupted):
    """The reference run's photos as shards, and 10 steps trained from them."""
    photos, _ = uninterrupted
    root = tmp_path_factory.mktemp("shards_reference")
    shards = make_shards(root / "shards", photos)
    run_dir = root / "run"
    run_trainer(tiny_run_args(run_dir, photos, f"data.shards={shards}", "train.max_steps=10", "train.save_every=3"))
    return shards, run_dir


@SHARES_THE_REFERENCE
def test_sigkill_mid_epoch_then_resume_from_shards_equals_uninterrupted(tmp_path, uninterrupted_from_shards):
    """Killed while decoding in a worker, resumed decoding on the device: on the CPU both paths are
    the same computation, so the weights are bit-identical to the uninterrupted run's."""
    shards, reference = uninterrupted_from_shards
    run_dir = tmp_path / "run"
    args = tiny_run_args(run_dir, tmp_path / "no_photos_here", f"data.shards={shards}", "train.max_steps=10",
                         "train.save_every=3")
    killed = run_trainer(args + ["data.num_workers=1", "data.decode_on=workers"], fault="sigkill@5", check=False)
    assert killed.returncode != 0
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step_00000003"]
    resumed = run_trainer(args + ["--resume", "latest", "data.decode_on=device"])
    assert "changed on resume: data.decode_on" in resumed.stdout + resumed.stderr
    assert "from shards" in resumed.stdout
    assert_same_weights(final_student(run_dir), final_student(reference))


@SHARES_THE_REFERENCE
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(tmp_path, uninterrupted):
    photos, reference = uninterrupted
    run_dir = tmp_path / "run"
    args = tiny_run_args(run_dir, photos, "train.max_steps=10", "train.save_every=3")
    killed = run_trainer(args, fault="sigkill@5", check=False)
    assert killed.returncode != 0
    assert not (run_dir / "student_last").exists()
    # Step 5 had passed; the last complete state is step 3: mid-epoch (batch 1 of 2 of epoch 1).
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step_00000003"]
    resumed = run_trainer(args + ["--resume", "latest"])
    assert "resumed from" in resumed.stdout + resumed.stderr
    assert_same_weights(final_student(run_dir), final_student(reference))
    # TensorBoard continues at the right step: the resumed part logs steps 7..10 once more, with
    # the same losses as the uninterrupted run.
    reference_loss = dict(scalar_events(reference)["train/loss"])
    resumed_loss = scalar_events(run_dir)["train/loss"]
    assert max(step for step, _ in resumed_loss) == 10
    for step, value in resumed_loss:
        assert value == pytest.approx(reference_loss[step], rel=1e-6), step


@SHARES_THE_REFERENCE
def test_corrupted_newest_state_falls_back_to_the_previous_one(tmp_path, uninterrupted):
    photos, reference = uninterrupted
    run_dir = tmp_path / "run"
    args = tiny_run_args(run_dir, photos, "train.max_steps=10", "train.save_every=3")
    run_trainer(args, fault="sigkill@7", check=False)
    newest = run_dir / "checkpoints" / "step_00000006" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])  # a write cut short
    (run_dir / "checkpoints" / ".tmp_step_00000009").mkdir()  # an interrupted save: ignored
    resumed = run_trainer(args + ["--resume", "latest"])
    assert "unreadable" in resumed.stderr and "step_00000003" in resumed.stdout + resumed.stderr
    assert_same_weights(final_student(run_dir), final_student(reference))


@SHARES_THE_REFERENCE
def test_sigterm_saves_a_resumable_state(tmp_path, uninterrupted):
    photos, reference = uninterrupted
    run_dir = tmp_path / "run"
    args = tiny_run_args(run_dir, photos, "train.max_steps=10", "train.save_every=100")
    stopped = run_trainer(args, fault="sigterm@4")
    assert "interrupted" in stopped.stdout + stopped.stderr
    # The signal lands after step 4; every process agrees on it at step 5, which is saved.
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step_00000005"]
    run_trainer(args + ["--resume", "latest"])
    assert_same_weights(final_student(run_dir), final_student(reference))


def test_a_loader_worker_left_running_does_not_hold_the_process_at_exit():
    """The train loader's workers ignore SIGTERM (a scheduler's stop signal reaches the whole process
    group, and the main process must save first), which is how multiprocessing ends daemonic children
    at exit before it waits for them: an iterator still referenced then kept a finished run waiting
    forever (seen once, after a quality run's summary)."""
    script = (
        "import types, torch\n"
        "from torch.utils.data import TensorDataset\n"
        "from trainer.config import Config\n"
        "from trainer.train.inputs import build_loaders\n"
        "cfg = Config()\n"
        "cfg.data.num_workers = 1\n"
        "cpu = types.SimpleNamespace(device=torch.device('cpu'))\n"
        "loader, _, _ = build_loaders(cfg, cpu, TensorDataset(torch.arange(64)), None, None)\n"
        "batches = iter(loader)\n"
        "next(batches)  # its worker is alive, and `batches` is only freed after the exit handlers\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_labeled_set_of_only_unreadable_pairs_stops_the_run_with_one_line(tmp_path, photo_dir):
    """Evaluation skips an unreadable pair, but a set that leaves nothing to score is a mistake: the
    run stops at its first evaluation, with one line (NaN metrics would pass for a result)."""
    labeled = make_labeled_set(tmp_path / "labeled", count=2)
    for depth in (labeled / "depth").iterdir():
        depth.write_bytes(b"")
    result = run_trainer(tiny_run_args(tmp_path / "run", photo_dir, "train.max_steps=1", f"data.labeled_dir={labeled}",
                                       "export.enabled=false"), check=False)
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no val_gt image could be scored" in errors[0], result.stderr[-3000:]
    assert result.stderr.count("skipping unreadable ground-truth photo") == 2


def test_nan_on_one_rank_is_skipped_on_both(tmp_path, photo_dir):
    run_dir = tmp_path / "run"
    result = run_trainer(tiny_run_args(run_dir, photo_dir, "train.max_steps=4", "train.save_every=100",
                                       "data.val_fraction=0"), processes=2, fault="nan@1:1")
    output = result.stdout + result.stderr
    assert output.count("non-finite loss, gradients or BatchNorm statistics, step skipped") == 1  # by rank 0
    events = scalar_events(run_dir)
    assert dict(events["train/nonfinite_steps"])[4] == 1
    assert all(np.isfinite(v) for _, v in events["train/grad_norm"])
    weights = load_file(run_dir / "student_last" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())
    # The schedule counts optimizer steps, not steps x processes: after 4 steps of the demo's
    # 5-step warm-up the factor is (4 + 1) / (5 + 1), skipped step included.
    assert dict(events["lr/decoder"])[4] == pytest.approx(1e-3 * 5 / 6)


def test_mid_epoch_position_is_carried_over_in_photos():
    from accelerate import PartialState

    from trainer.train.loop import Progress, remap_epoch_position

    PartialState()  # the trainer's logger speaks through Accelerate's process state
    progress = Progress(batches_in_epoch=3, global_batch=8)  # saved on 4 processes x batch 2
    remap_epoch_position(progress, 4)  # resumed on 2 processes x batch 2
    assert (progress.batches_in_epoch, progress.global_batch) == (6, 4)
    remap_epoch_position(progress, 4)  # same layout: nothing moves
    assert progress.batches_in_epoch == 6


def test_persistent_nan_stops_with_a_clear_error(tmp_path, photo_dir):
    run_dir = tmp_path / "run"
    result = run_trainer(tiny_run_args(run_dir, photo_dir, "train.max_steps=10", "train.max_nonfinite_steps=3",
                                       "train.save_every=1"), fault="nan@*", check=False)
    assert result.returncode == 2
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "3 steps in a row had a non-finite loss, gradients or BatchNorm" in error
    assert "Traceback" not in result.stderr
    assert not (run_dir / "student.onnx").exists()
    # Skipped steps leave the weights as they were: what was saved is finite and loadable.
    for state in (run_dir / "checkpoints").iterdir():
        assert all(torch.isfinite(t).all() for t in load_file(state / "model.safetensors").values())


def test_two_process_evaluation_equals_one_process(tmp_path, photo_dir):
    """5 photos on 2 processes at batch 2: shards are uneven and Accelerate pads the last batch;
    gather_for_metrics must drop the padding so no photo is counted twice."""
    from modeling import StudentDepthModel
    from trainer.config import load_config, to_yaml

    (photo_dir / "extra.jpg").write_bytes(sorted((REPO / "data" / "samples").glob("*.jpg"))[5].read_bytes())
    torch.manual_seed(0)
    checkpoint = tmp_path / "run" / "student_best"
    StudentDepthModel(decoder_width=16, head_width=8).save_pretrained(checkpoint)
    cfg = load_config(DEMO, ["data.teacher_size=70", "data.student_size=64", "data.num_workers=0"])
    (tmp_path / "run" / "config.yaml").write_text(to_yaml(cfg))
    results = {}
    for processes in (1, 2):
        out = tmp_path / f"{processes}.json"
        args = ["--checkpoint", str(checkpoint), "--data", str(photo_dir), "--batch-size", "2", "--json", str(out)]
        result = run_warm("trainer.evaluate.cli", args, launch_env(), processes)
        assert result.returncode == 0, result.stderr[-3000:]
        results[processes] = json.loads(out.read_text())
    assert results[1]["num_images"] == results[2]["num_images"] == 5
    for name, value in results[1].items():
        assert results[2][name] == pytest.approx(value, rel=1e-5, abs=1e-6), name


def test_training_from_the_teacher_cache(tmp_path, photo_dir):
    from trainer.train.cache_teacher import main as cache_main

    cache = tmp_path / "cache"
    (photo_dir / "broken.jpg").write_bytes(b"not a photo")
    overrides = [f"data.train_dir={photo_dir}", "data.teacher_size=70", "data.student_size=64",
                 "data.num_workers=0"]
    assert cache_main(["--config", DEMO, "--cache-dir", str(cache), *overrides]) == 0
    run_dir = tmp_path / "run"
    result = run_trainer(tiny_run_args(run_dir, photo_dir, "train.max_steps=3", f"distill.teacher_cache={cache}",
                                       "distill.cache_features=drop"))
    assert "targets: depth from the teacher cache; feature terms off" in result.stdout
    events = scalar_events(run_dir)
    assert "train/ssi" in events and "train/feature" not in events
    assert dict(events["train/bad_images"])[3] >= 1  # the broken photo, met and counted
    # The default recipe's feature term reads the teacher's features stored with the cache: no teacher runs.
    stored = run_trainer(tiny_run_args(tmp_path / "stored", photo_dir, "train.max_steps=3",
                                       f"distill.teacher_cache={cache}"))
    assert "targets: depth and features from the teacher cache" in stored.stdout
    assert "train/feature" in scalar_events(tmp_path / "stored")
    # A cache made for another teacher resolution is refused before training starts.
    stale = run_trainer(tiny_run_args(tmp_path / "stale", photo_dir, "data.teacher_size=56",
                                      f"distill.teacher_cache={cache}"), check=False)
    assert stale.returncode == 1 and "cache" in stale.stderr.splitlines()[-1]


@pytest.mark.parametrize("override, expected", [
    ("student.backbone=mobilevit_zz", "timm does not know the student backbone 'mobilevit_zz'"),
    ("teacher.name=./no/such/teacher", "teacher directory './no/such/teacher' does not exist"),
    ("teacher.name=depth-anything/not-a-model", "HF_HUB_OFFLINE"),
])
def test_unloadable_models_are_one_line_errors(tmp_path, photo_dir, capsys, override, expected):
    from trainer.main import main

    assert main(tiny_run_args(tmp_path / "run", photo_dir, override)) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("error:") and expected in error and len(error.splitlines()) == 1
    assert not (tmp_path / "run" / "checkpoints").exists()


def photos_and_lr(run_dir: Path) -> dict[float, float]:
    """lr/decoder by train/photos_seen: the same axis on any number of processes."""
    events = scalar_events(run_dir)
    photos_at = dict(events["train/photos_seen"])
    return {photos_at[step]: lr for step, lr in events["lr/decoder"]}


RESUME_ARGS = ["train.epochs=3", "train.save_every=1", "data.val_fraction=0", "export.enabled=false",
               "optim.warmup_steps=1"]


@pytest.fixture(scope="module")
def planned_schedule(tmp_path_factory):
    """lr by photos seen in an uninterrupted run on N processes, trained once per N for the
    tests below (the schedule does not depend on where the photos come from)."""
    root = tmp_path_factory.mktemp("schedules")
    photos = root / "photos"
    photos.mkdir()
    for path in sorted((REPO / "data" / "samples").glob("*.jpg"))[:4]:
        (photos / path.name).write_bytes(path.read_bytes())
    schedules: dict[int, dict[float, float]] = {}

    def of(processes: int) -> dict[float, float]:
        if processes not in schedules:
            run_trainer(tiny_run_args(root / str(processes), photos, *RESUME_ARGS), processes)
            schedules[processes] = photos_and_lr(root / str(processes))
        return schedules[processes]
    return of


@pytest.mark.xdist_group("planned_schedule")
@pytest.mark.parametrize("first, then, source", [(1, 2, "folder"), (2, 1, "folder"), (2, 1, "shards")])
def test_resume_on_another_number_of_processes_trains_the_same_photos(tmp_path, photo_dir, planned_schedule, first,
                                                                      then, source):
    """4 photos, batch 2 per process, 3 epochs = 12 photos: 6 steps on one process, 3 on two.
    Before the schedule and the stopping point were counted in photos, 1 -> 2 processes resumed
    at a step past the new total and trained nothing, and 2 -> 1 trained 3.67 epochs with the
    cosine schedule stretched. (A resume at a photo count that is not a multiple of the new
    photos per step ends at the first step past the planned count: at most one step more.)"""
    args = list(RESUME_ARGS)
    if source == "shards":
        args.append(f"data.shards={make_shards(tmp_path / 'shards', photo_dir, *args)}")
    run_dir = tmp_path / "run"
    run_trainer(tiny_run_args(run_dir, photo_dir, *args), first, fault="sigkill@2", check=False)
    run_trainer(tiny_run_args(run_dir, photo_dir, *args) + ["--resume", "latest"], then)
    expected, resumed = planned_schedule(first), photos_and_lr(run_dir)
    assert max(expected) == max(resumed) == 12
    shared = set(expected) & set(resumed)
    assert 12 in shared and len(shared) >= 2
    for photos in shared:
        assert resumed[photos] == pytest.approx(expected[photos], rel=1e-6), photos


def test_a_failed_final_save_exits_non_zero_and_says_what_was_kept(tmp_path, photo_dir):
    """A full disk at the end of a run used to end in exit code 0."""
    run_dir = tmp_path / "run"
    result = run_trainer(tiny_run_args(run_dir, photo_dir, "train.max_steps=4", "train.save_every=2",
                                       "data.val_fraction=0"), fault="diskfull@3", check=False)
    assert result.returncode == 4, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "could not save the end of the run at step 4" in errors[0]
    assert str(run_dir / "checkpoints" / "step_00000002") in errors[0]
    assert not (run_dir / "student.onnx").exists() and not (run_dir / "student_last").exists()


def test_a_failed_export_exits_3_and_keeps_the_trained_student(tmp_path, photo_dir):
    run_dir = tmp_path / "run"
    result = run_trainer(tiny_run_args(run_dir, photo_dir, "train.max_steps=1", "export.opset=99"), check=False)
    assert result.returncode == 3, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "ONNX export" in result.stderr
    assert (run_dir / "student_last" / "model.safetensors").is_file()


def test_a_batch_of_only_unreadable_photos_is_a_zero_loss_step(tmp_path):
    """1 readable photo and 3 broken ones at batch size 1: 3 of every 4 steps see no readable
    photo. Such a step still runs (every process must join the gradient all-reduce) with loss 0:
    nothing is learned from the blank stand-in, and it is counted."""
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "good.jpg").write_bytes(sorted((REPO / "data" / "samples").glob("*.jpg"))[0].read_bytes())
    for name in ("bad1.jpg", "bad2.jpg", "bad3.jpg"):
        (photos / name).write_bytes(b"not a photo")
    run_dir = tmp_path / "run"
    run_trainer(tiny_run_args(run_dir, photos, "train.batch_size=1", "train.max_steps=8", "data.val_fraction=0",
                              "export.enabled=false", "distill.weights.feature=0"))
    events = scalar_events(run_dir)
    losses = [value for _, value in sorted(events["train/loss"])]
    assert len(losses) == 8 and sum(value == 0.0 for value in losses) == 6
    assert all(value > 0 for value in losses if value != 0.0)
    assert dict(events["train/bad_images"])[8] == 6
    assert all(torch.isfinite(t).all() for t in final_student(run_dir).values())
