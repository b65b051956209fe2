"""The user's side of the command line: files never lost, one-line errors, flags in any order,
exit codes and signals through the real launchers (`launch.sh`, `trainer.launch`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.launching import accelerate_launch, free_port, port_flag
from tests.test_trainer import DEMO, REPO, TINY, run_trainer, scalar_events, tiny_run_args

LAUNCH_ENV = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": f"{Path(sys.executable).parent}:"
              + os.environ.get("PATH", "")}


def launch_sh(args: list[str], accelerate_config: str = "cpu", fault: str | None = None,
              env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **LAUNCH_ENV, "ACCELERATE_CONFIG": accelerate_config, **(env_extra or {})}
    env = {name: value for name, value in env.items() if value is not None and name != "DEPTH_DISTILL_FAULT"}
    if fault:
        env["DEPTH_DISTILL_FAULT"] = fault
    return subprocess.run(["./launch.sh", *port_flag(), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("error:")]


def assert_one_clean_error(result: subprocess.CompletedProcess, code: int, expected: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == code, output[-3000:]
    assert "Traceback" not in output and "CalledProcessError" not in output and "ChildFailedError" not in output, \
        output[-3000:]
    lines = error_lines(result)
    assert len(lines) == 1 and expected in lines[0], output[-3000:]


# --- 1. --overwrite deletes only what a run wrote ----------------------------------------------

def test_overwrite_never_deletes_a_folder_that_holds_no_run(tmp_path, photo_dir, capsys):
    """On the old code, `--overwrite output_dir=.` deleted the source tree, .git included."""
    from trainer.main import main

    project = tmp_path / "project"
    (project / ".git").mkdir(parents=True)
    (project / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (project / "config.yaml").write_text("my: own settings\n")
    (project / "notes.txt").write_text("keep me\n")
    code = main(tiny_run_args(project, photo_dir, "train.max_steps=1") + ["--overwrite"])
    assert code == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("error:") and "nothing was deleted" in error and len(error.splitlines()) == 1
    assert (project / ".git" / "HEAD").read_text() == "ref: refs/heads/main\n"
    assert (project / "config.yaml").read_text() == "my: own settings\n"
    assert (project / "notes.txt").is_file()


def test_overwrite_replaces_only_the_runs_own_outputs(tmp_path, photo_dir):
    run_dir = tmp_path / "run"
    (photo_dir / "broken.jpg").write_bytes(b"not a photo at all")
    # Two loader workers and 3 epochs: the broken photo is met in several epochs and workers.
    args = tiny_run_args(run_dir, photo_dir, "train.epochs=3", "data.num_workers=2", "data.val_fraction=0",
                         "export.enabled=false")
    first = run_trainer(args)
    assert (first.stdout + first.stderr).count(f"skipping unreadable training photo {photo_dir / 'broken.jpg'}") == 1
    (run_dir / "my_notes.txt").write_text("mine\n")
    (run_dir / "depth").mkdir()  # e.g. predict's output, written there by the user
    (run_dir / "depth" / "a_depth.png").write_bytes(b"png")
    old_events = sorted((run_dir / "tensorboard").iterdir())
    second = run_trainer(args + ["--overwrite", "train.epochs=1"])
    assert "deleted the previous run's" in second.stdout
    assert (run_dir / "my_notes.txt").read_text() == "mine\n"
    assert (run_dir / "depth" / "a_depth.png").read_bytes() == b"png"
    assert not set(old_events) & set((run_dir / "tensorboard").iterdir())  # the old run's logs are gone


def test_a_run_refuses_to_write_over_files_it_did_not_write(tmp_path, photo_dir, capsys):
    from trainer.main import main

    folder = tmp_path / "results"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "precious.pt").write_bytes(b"weights")
    assert main(tiny_run_args(folder, photo_dir)) == 1
    assert "holds checkpoints but no run of this trainer" in capsys.readouterr().err
    assert (folder / "checkpoints" / "precious.pt").read_bytes() == b"weights"


# --- 2. training on nothing stops at once -------------------------------------------------------

def test_a_folder_of_unreadable_files_stops_before_training(tmp_path, capsys):
    from trainer.main import main

    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("a.jpg", "b.png", "c.jpg"):
        (photos / name).write_bytes(b"\xff\xd8\xff garbage")
    run_dir = tmp_path / "run"
    assert main(tiny_run_args(run_dir, photos, "data.val_fraction=0")) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: none of the 3 training files under") and len(error.splitlines()) == 1
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "student.onnx").exists()


def test_an_unreadable_validation_set_stops_before_training(tmp_path, photo_dir, capsys):
    from trainer.main import main

    val = tmp_path / "val"
    val.mkdir()
    (val / "x.jpg").write_bytes(b"")
    assert main(tiny_run_args(tmp_path / "run", photo_dir, f"data.val_dir={val}")) == 1
    assert "none of the 1 validation file under" in capsys.readouterr().err


# --- 4. one line for common mistakes --------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("train:\n\tepochs: 3\n", "a tab: YAML indents with spaces only"),
    ("train: {epochs: 3\n", "is not valid YAML at line 2"),
    ("- train\n- epochs\n", "not a list"),
])
def test_yaml_mistakes_are_one_line(tmp_path, capsys, text, expected):
    from trainer.main import main

    config = tmp_path / "bad.yaml"
    config.write_text(text)
    assert main(["--config", str(config)]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("error:") and expected in error and len(error.splitlines()) == 1


def test_an_unwritable_output_dir_is_found_before_models_are_built(tmp_path, photo_dir, capsys):
    from trainer.main import main

    (tmp_path / "a_file").write_text("x")
    assert main(tiny_run_args(tmp_path / "a_file" / "run", photo_dir)) == 1
    error = capsys.readouterr().err.strip()
    assert "is not writable" in error and len(error.splitlines()) == 1


# --- 5. flags and overrides in any order ---------------------------------------------------------

def test_paths_are_shown_relative_to_the_current_folder_when_under_it(tmp_path, monkeypatch):
    from trainer.console import shown_path

    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    assert shown_path(tmp_path / "work" / "runs" / "demo") == "runs/demo"
    assert shown_path(Path("runs/demo")) == "runs/demo"
    assert shown_path(tmp_path / "elsewhere") == str((tmp_path / "elsewhere").resolve())
    assert shown_path(Path("../elsewhere")) == str((tmp_path / "elsewhere").resolve())


def test_flags_and_overrides_mix_in_any_order():
    from trainer.main import parse_args

    args = parse_args(["--config", "x.yaml", "run_name=a", "--overwrite", "data.train_dir=b", "--resume", "latest",
                       "optim.lr=1"])
    assert (args.config, args.overwrite, args.resume) == ("x.yaml", True, "latest")
    assert args.overrides == ["run_name=a", "data.train_dir=b", "optim.lr=1"]


def test_launcher_flags_reach_the_launcher_wherever_they_stand():
    from trainer.launch import split_arguments

    launcher, trainer = split_arguments(["--config_file", "c.yaml", "--config", "demo.yaml", "--num_processes", "2",
                                         "optim.lr=1", "--mixed_precision=bf16", "--resume", "latest", "--cpu"])
    assert launcher == ["--config_file", "c.yaml", "--num_processes", "2", "--mixed_precision=bf16", "--cpu"]
    assert trainer == ["--config", "demo.yaml", "optim.lr=1", "--resume", "latest"]


# --- 6. --resume is the run that was saved ----------------------------------------------------------

def test_resume_uses_the_saved_configuration(tmp_path, photo_dir):
    run_dir = tmp_path / "run"
    base = ["--config", DEMO, f"output_dir={run_dir}", *TINY, "data.val_fraction=0", "export.enabled=false"]
    run_trainer(base + [f"data.train_dir={photo_dir}", "train.max_steps=2", "train.save_every=1",
                        "optim.lr=0.002"])
    # Changing what is trained is refused, with the reason; nothing of the run changes.
    refused = run_trainer(base + ["--resume", "latest", "optim.lr=0.1"], check=False)
    assert refused.returncode == 1 and "optim.lr=0.1 would change the run" in refused.stderr
    assert "lr: 0.002" in (run_dir / "config.yaml").read_text()
    # Resuming without the original overrides keeps them (old code: back to the YAML's values).
    resumed = run_trainer(base + ["--resume", "latest", "train.max_steps=3"])
    assert "changed on resume: train.max_steps: 2 -> 3" in resumed.stdout
    events = scalar_events(run_dir)
    assert max(step for step, _ in events["train/loss"]) == 3
    # Step 3 of the demo's 5-step warm-up: the saved lr (not the demo's 1e-3) times (3 + 1) / (5 + 1).
    assert dict(events["lr/decoder"])[3] == pytest.approx(0.002 * 4 / 6)
    text = (run_dir / "config.yaml").read_text()
    assert "lr: 0.002" in text and "max_steps: 3" in text and str(photo_dir) in text


# --- 3. exit codes, errors and signals through the real launchers ---------------------------------

@pytest.mark.parametrize("accelerate_config", ["cpu", "cpu_2proc"])
def test_a_config_error_through_launch_sh_is_one_line(accelerate_config):
    """As a user starts it, without OMP_NUM_THREADS: nothing but the error line, not even accelerate's
    warning about the CPU threads it chose (launch.sh passes them)."""
    result = launch_sh(["--config", DEMO, "train.epochs=0"], accelerate_config, env_extra={"OMP_NUM_THREADS": None})
    assert_one_clean_error(result, 1, "train.epochs")
    assert (result.stdout + result.stderr).strip().splitlines() == error_lines(result)


def test_a_tool_mistake_through_launch_sh_m_is_one_line(tmp_path):
    """`./launch.sh -m trainer.evaluate` on two processes: the tool's one line and exit code, not
    torch's ChildFailedError report (plain `accelerate launch -m` wraps it in a traceback)."""
    result = launch_sh(["-m", "trainer.evaluate", "--checkpoint", str(tmp_path / "missing"), "--data", str(tmp_path)],
                       "cpu_2proc")
    assert_one_clean_error(result, 1, "missing does not exist")


def test_exit_codes_through_launch_sh(tmp_path, photo_dir):
    """Two processes, and torch's launcher reports the failure with its own traceback: still the
    trainer's code and its one line. (Each code of the trainer's own is tested in test_trainer.py;
    how trainer.launch picks the code it exits with, in test_launch.py.)"""
    save_failed = launch_sh(tiny_run_args(tmp_path / "full", photo_dir, "train.max_steps=4", "train.save_every=2",
                                          "data.val_fraction=0", "export.enabled=false"), "cpu_2proc",
                            fault="diskfull@3")
    assert_one_clean_error(save_failed, 4, "could not save the end of the run at step 4")


def _start(args: list[str], accelerate_config: str) -> subprocess.Popen:
    env = {**os.environ, **LAUNCH_ENV, "ACCELERATE_CONFIG": accelerate_config}
    env.pop("DEPTH_DISTILL_FAULT", None)
    return subprocess.Popen(["./launch.sh", *port_flag(), *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_for_training(run_dir: Path, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not list((run_dir / "tensorboard").glob("events.out.tfevents.*")):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.2)
    time.sleep(2.0)  # a few steps into the loop


@pytest.mark.parametrize("accelerate_config, how", [("cpu", "sigterm_launcher"), ("cpu_2proc", "sigint_group")])
def test_a_signal_saves_a_state_and_exits_0(tmp_path, photo_dir, accelerate_config, how):
    """SIGTERM to the launcher alone (a scheduler signals PID 1; the old single-process launcher
    died and left the trainer running unsupervised), or Ctrl-C to the whole process group. Each
    way once, and each number of processes once: trainer.launch forwards both signals the same way
    to however many trainers it started."""
    run_dir = tmp_path / "run"
    process = _start(tiny_run_args(run_dir, photo_dir, "train.max_steps=100000", "train.save_every=100000",
                                   "data.val_fraction=0"), accelerate_config)
    _wait_for_training(run_dir, process)
    if how == "sigterm_launcher":
        process.send_signal(signal.SIGTERM)
    else:
        os.killpg(process.pid, signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert "interrupted: resumable state saved at step" in stdout
    assert len(list((run_dir / "checkpoints").glob("step_*"))) == 1
    # Nothing of the run is left running.
    leftover = subprocess.run(["pgrep", "-f", str(run_dir)], capture_output=True, text=True).stdout.split()
    assert not leftover


# --- 8. evaluate under a mis-configured 2-process launcher ----------------------------------------

def test_evaluate_refuses_two_processes_that_each_think_they_are_alone(tmp_path, photo_dir):
    import torch

    from modeling import StudentDepthModel

    torch.manual_seed(0)
    StudentDepthModel(decoder_width=16, head_width=8).save_pretrained(tmp_path / "student")
    env = {**os.environ, **LAUNCH_ENV}
    env.pop("ACCELERATE_USE_CPU", None)
    result = subprocess.run([*accelerate_launch("cpu_2proc"), "-m", "trainer.evaluate", "--checkpoint",
                             str(tmp_path / "student"), "--data", str(photo_dir)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    lines = error_lines(result)
    assert len(lines) == 1 and "ACCELERATE_USE_CPU" in lines[0]
    assert "abs_rel" not in result.stdout  # no table printed twice (or at all)


# --- 4. evaluate's own mistakes ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved_student(tmp_path_factory) -> Path:
    import torch

    from modeling import StudentDepthModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("evaluate") / "run" / "student_best"
    StudentDepthModel(decoder_width=16, head_width=8, input_size=64).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("make_args, expected", [
    (lambda s, d, t: ["--data", str(t / "missing")], "no such folder"),
    (lambda s, d, t: ["--data", str(t)], "no images"),
    (lambda s, d, t: ["--data", str(d), "--labeled"], "must hold images/ and depth/"),
    (lambda s, d, t: ["--data", str(d), "--json", str(t / "no" / "m.json")], "does not exist"),
    (lambda s, d, t: ["--data", str(d)], "HF_HUB_OFFLINE"),  # no run config: the hub teacher, offline
])
def test_evaluate_mistakes_are_one_line(tmp_path, photo_dir, saved_student, capsys, make_args, expected):
    from trainer.evaluate.cli import main

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["--checkpoint", str(saved_student), *make_args(saved_student, photo_dir, empty)]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("error:") and expected in error and len(error.splitlines()) == 1


def test_evaluate_skips_an_unreadable_ground_truth_pair_and_names_it(tmp_path, saved_student, capsys):
    from tests.test_trainer import make_labeled_set
    from trainer.evaluate.cli import main

    labeled = make_labeled_set(tmp_path / "labeled")
    (labeled / "depth" / "1.npy").write_bytes(b"not an array")
    assert main(["--checkpoint", str(saved_student), "--data", str(labeled), "--labeled"]) == 0
    out, err = capsys.readouterr()
    assert "(2 images)" in out
    assert err.count("skipping unreadable ground-truth photo") == 1 and "1.png (its depth 1.npy: " in err
    for depth in (labeled / "depth").iterdir():
        depth.write_bytes(b"")
    assert main(["--checkpoint", str(saved_student), "--data", str(labeled), "--labeled"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: --data ")


def test_evaluate_a_corrupt_student_folder_is_one_line(tmp_path, photo_dir, saved_student, capsys):
    from trainer.evaluate.cli import main

    broken = tmp_path / "student_best"
    broken.mkdir()
    (broken / "config.json").write_text((saved_student / "config.json").read_text())
    (broken / "model.safetensors").write_bytes((saved_student / "model.safetensors").read_bytes()[:64])
    assert main(["--checkpoint", str(broken), "--data", str(photo_dir)]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("error:") and "model.safetensors" in error and len(error.splitlines()) == 1


@pytest.mark.parametrize("module", ["trainer.main", "trainer.evaluate.cli", "trainer.ship.export",
                                    "trainer.ship.predict", "trainer.ship.quantize", "trainer.train.cache_teacher"])
def test_a_usage_mistake_is_one_line_with_exit_code_1(module, capsys):
    import importlib

    with pytest.raises(SystemExit) as stop:
        importlib.import_module(module).main(["--no-such-flag"])
    assert stop.value.code == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("error:") and len(error.splitlines()) == 1
    assert "--no-such-flag" in error or "required" in error


# --- several nodes (issue 10): two launchers over 127.0.0.1, one process each -----------------------

def launch_two_nodes(args_of_node) -> list[subprocess.CompletedProcess]:
    port = str(free_port())
    env = {**os.environ, **LAUNCH_ENV, "ACCELERATE_USE_CPU": "true"}
    env.pop("DEPTH_DISTILL_FAULT", None)
    launcher = [sys.executable, "-m", "trainer.launch", "--config_file", "accelerate_configs/cpu_2proc.yaml",
                "--num_machines", "2", "--main_process_ip", "127.0.0.1", "--main_process_port", port,
                "--num_processes", "2"]
    nodes = [subprocess.Popen([*launcher, "--machine_rank", str(rank), *args_of_node(rank)],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    results = []
    for node in nodes:
        stdout, stderr = node.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(node.args, node.returncode, stdout, stderr))
    return results


def test_two_nodes_over_loopback_train_like_two_processes_on_one(tmp_path, photo_dir):
    from tests.test_trainer import assert_same_weights, final_student

    extra = ["train.max_steps=3", "data.val_fraction=0", "export.enabled=false"]
    one_node = tmp_path / "one_node"
    run_trainer(tiny_run_args(one_node, photo_dir, *extra), processes=2)
    two_nodes = tmp_path / "two_nodes"
    node0, node1 = launch_two_nodes(lambda rank: tiny_run_args(two_nodes, photo_dir, *extra))
    assert node0.returncode == node1.returncode == 0, node0.stderr[-2000:] + node1.stderr[-2000:]
    assert_same_weights(final_student(two_nodes), final_student(one_node))
    assert "done after" in node0.stdout and not node1.stdout.strip()  # only the global main process speaks
    assert "distill:" not in node1.stderr  # no second progress bar


def test_two_nodes_without_a_shared_output_dir_stop_with_one_line_each(tmp_path, photo_dir):
    """Each node here writes to its own folder, as nodes do on their own disks: the run used to go
    on, leaving orphaned .tmp_ states on one node (and a resume hung the other node forever)."""
    nodes = launch_two_nodes(lambda rank: tiny_run_args(tmp_path / f"disk_of_node{rank}" / "run", photo_dir,
                                                        "train.max_steps=3"))
    for node in nodes:
        assert_one_clean_error(node, 1, "is not shared by all processes")
    assert not (tmp_path / "disk_of_node0" / "run" / "checkpoints").exists()
