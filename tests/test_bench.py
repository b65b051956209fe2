"""The benchmarks run end to end at tiny settings and write their figures. No timing is asserted:
only that every figure is there, positive and finite."""

import json
import math
import time

import pytest

from bench import dataloader, fidelity, gpu_check, inference, train_step
from tests.warm import run_warm

TINY_SIZES = ["--teacher-size", "42", "--student-size", "64"]


def _positive(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def test_train_step_times_live_and_cached_steps(tmp_path):
    path = tmp_path / "train_step.json"
    train_step.main([*TINY_SIZES, "--tiny", "--batch-size", "2", "--steps", "1", "--warmup", "1", "--threads", "1",
                     "--variants", "live,cached,live_features,cached_features", "--json", str(path)])
    figures = json.loads(path.read_text())
    assert _positive(figures["cached_speedup_vs_live"]) and _positive(figures["cached_speedup_vs_live_excluding_data"])
    assert _positive(figures["cached_speedup_vs_live_default_recipe"])
    # The default recipe's term from the cache: the feature loss on, no teacher forward at all.
    live_default, cached_default = figures["variants"]["live_features"], figures["variants"]["cached_features"]
    default_weights = {"ssi": 1.0, "gradient": 0.5, "feature": 0.1}
    assert cached_default["loss_weights"] == live_default["loss_weights"] == default_weights
    assert cached_default["ms_per_step"]["teacher_forward"] == 0 < live_default["ms_per_step"]["teacher_forward"]
    storage = figures["cache_mb_per_photo"]
    assert storage["depth"] == 2 * 42 ** 2 / 1e6 and storage["features"] > 0
    assert math.isclose(storage["total"], storage["depth"] + storage["features"])
    live, cached = figures["variants"]["live"], figures["variants"]["cached"]
    assert live["dataset"] == "UnlabeledImageDataset" and cached["dataset"] == "CachedTeacherDataset"
    # The comparison is fair: the same depth-only loss on both sides.
    assert live["loss_weights"] == cached["loss_weights"] == {"ssi": 1.0, "gradient": 0.5}
    for variant in (live, cached):
        assert _positive(variant["images_per_s"]) and _positive(variant["peak_memory_mb"])
        assert set(variant["ms_per_step"]) == {*train_step.PHASES, "total"}
        assert variant["host_syncs_per_step"] == 1  # the trainer's own step: one agreed all-reduce
    assert cached["ms_per_step"]["teacher_forward"] < live["ms_per_step"]["teacher_forward"]
    assert figures["machine"]["logical_cpus"] >= 1 and figures["settings"]["torch_threads"] == 1


def test_the_host_sync_counter_counts_reads_by_project_code():
    import torch

    from bench.common import HostSyncCounter
    from trainer.train.checkpoint import all_finite

    with HostSyncCounter(torch.device("cpu")) as counter:
        all_finite(torch.nn.Linear(2, 2))  # one bool() per tensor: weight and bias
        torch.ones(3).sum().item()  # the test's own read, not the project's
    assert counter.count == 2
    assert torch.Tensor.item.__name__ == "item"  # the methods are restored


def test_inference_compares_the_presets_with_the_teacher_in_onnxruntime(tmp_path):
    path = tmp_path / "inference.json"
    inference.main(["--tiny", "--teacher-size", "42", "--student-size", "64", "--threads", "1", "--rounds", "2",
                    "--runs", "1", "--warmup", "1", "--quant-modes", "dynamic", "--presets", "lean,dpt64",
                    "--json", str(path)])
    figures = json.loads(path.read_text())
    models = {"teacher_onnx_42", "teacher_onnx_56", "teacher_pytorch_42", "student_lean_onnx_fp32",
              "student_lean_onnx_int8_dynamic", "student_dpt64_onnx_fp32", "student_dpt64_onnx_int8_dynamic",
              "student_encoder_only_onnx_fp32"}
    assert set(figures["latency"]) == set(figures["gflops"]) == set(figures["params"]) == models
    for stats in figures["latency"].values():
        assert stats["runs"] == 2 and 0 < stats["p10_ms"] <= stats["median_ms"] <= stats["p90_ms"]
    median = {name: stats["median_ms"] for name, stats in figures["latency"].items()}
    # The keys scripts read, each the ratio it names (56: the student's 64 rounded down to 14).
    assert figures["student_speedup_vs_teacher"] == median["teacher_onnx_42"] / median["student_lean_onnx_fp32"]
    assert figures["student_speedup_vs_teacher_same_size"] == (median["teacher_onnx_56"]
                                                               / median["student_lean_onnx_fp32"])
    assert figures["student_speedup_vs_presets"]["dpt64"] == (median["student_dpt64_onnx_fp32"]
                                                              / median["student_lean_onnx_fp32"])
    assert figures["gflops"]["student_lean_onnx_fp32"] < figures["gflops"]["student_dpt64_onnx_fp32"]
    assert figures["params"]["teacher_onnx_42"] == figures["params"]["teacher_pytorch_42"]
    int8 = figures["int8"]["lean_dynamic"]
    assert int8["num_images"] == 8 and 0 <= int8["aligned_abs_rel"] < 1 and 0 < int8["aligned_delta1"] <= 1
    assert figures["export"]["lean"]["accepted_sizes"] == "any H and W that are multiples of 64"
    bound = figures["encoder_only_bound"]
    assert bound["share_of_default_student"] == (median["student_encoder_only_onnx_fp32"]
                                                 / median["student_lean_onnx_fp32"])
    assert figures["settings"]["torch_threads"] == figures["settings"]["ort_intra_op_threads"] == 1


def test_fidelity_distils_each_preset_and_scores_it_against_the_teacher(tmp_path):
    path = tmp_path / "fidelity.json"
    fidelity.main(["--steps", "2", "--batch-size", "2", "--teacher-size", "56", "--student-size", "64",
                   "--threads", "1", "--presets", "lean,dpt64", "--targets", "live,cached,cached_depth_only",
                   "--json", str(path)])
    figures = json.loads(path.read_text())
    assert set(figures["presets"]) == {"lean", "dpt64", "lean+cached", "dpt64+cached", "lean+cached_depth_only",
                                       "dpt64+cached_depth_only"}
    assert figures["presets"]["lean+cached"]["targets"] == "depth and features from the teacher cache"
    assert figures["presets"]["lean+cached_depth_only"]["targets"] == "depth from the teacher cache; feature terms off"
    for result in figures["presets"].values():
        # The seeded split of the 8 sample photos: 2 held out, 6 trained on.
        assert (result["held_out"]["num_images"], result["training_photos"]["num_images"]) == (2, 6)
        for scored in (result["held_out"], result["training_photos"]):
            assert 0 <= scored["aligned_abs_rel"] < 1 and 0 < scored["aligned_delta1"] <= 1
            assert scored["gradient_error"] > 0
            # A flat map has no edges at all: its gradient error is exactly 1.
            assert scored["constant_baseline"]["gradient_error"] == 1.0


def test_the_gradient_error_is_zero_for_the_same_map_up_to_scale_and_shift():
    import torch

    teacher = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    assert fidelity.gradient_error(3 * teacher + 1, teacher).abs().max() < 1e-5
    assert (fidelity.gradient_error(torch.rand(2, 1, 16, 16), teacher) > 0.5).all()


def test_dataloader_compares_folder_and_shards_with_the_step(tmp_path):
    step = {"settings": {"teacher_size": 42, "student_size": 64},
            "variants": {"live": {"dataset": "UnlabeledImageDataset", "images_per_s_excluding_data": 2.0},
                         "cached": {"dataset": "CachedTeacherDataset", "images_per_s_excluding_data": 8.0}}}
    (tmp_path / "step.json").write_text(json.dumps(step))
    path = tmp_path / "dataloader.json"
    dataloader.main([*TINY_SIZES, "--photo-size", "320x240", "--batch-size", "2", "--workers", "0", "--items", "6",
                     "--rounds", "1", "--step-json", str(tmp_path / "step.json"), "--json", str(path)])
    figures = json.loads(path.read_text())
    pipelines = figures["pipelines"]
    assert set(pipelines) == {"folder", "shards_cpu_decode", "shards_device_decode"}
    for name, p in pipelines.items():
        assert _positive(p["photos_per_s"]) and p["photos_per_s_per_worker"] == p["photos_per_s"]  # no workers
        assert _positive(p["device_photos_per_s"]), name  # every pipeline's views are finished on the device
    assert math.isclose(figures["shards_vs_folder_per_worker"], pipelines["shards_cpu_decode"]["photos_per_s"]
                        / pipelines["folder"]["photos_per_s"])
    assert figures["settings"]["photos"]["size"].startswith("320x240")
    assert {name: _positive(d["ms_per_photo"]) for name, d in figures["decoders"].items()} == {
        "folder_pipeline": True, "torchvision_io": True}
    device_decode = pipelines["shards_device_decode"]
    feed = min(device_decode["photos_per_s"], device_decode["device_photos_per_s"])
    assert math.isclose(figures["pipeline_vs_step"]["shards_device_decode"]["cached"], feed / 8.0)
    folder = pipelines["folder"]
    assert math.isclose(figures["pipeline_vs_step"]["folder"]["live"],
                        min(folder["photos_per_s"], folder["device_photos_per_s"]) / 2.0)


def test_gpu_check_in_tiny_mode_writes_every_section(tmp_path, monkeypatch):
    import torch

    run_part = gpu_check.run_part

    def warm_part(name, out, budget_s, tiny):
        """The first part through run_part itself (its process, its budget); the others run the
        same command, `python -m bench.gpu_check --part NAME`, in warm processes (tests/warm.py)."""
        if name == gpu_check.PARTS[0]:
            return run_part(name, out, budget_s, tiny)
        started = time.perf_counter()
        done = run_warm("bench.gpu_check", ["--part", name, "--out", str(out), *(["--tiny"] if tiny else [])])
        assert done.returncode == 0, done.stderr[-3000:]
        return {**json.loads((out / "parts" / f"{name}.json").read_text()), "seconds": time.perf_counter() - started}

    monkeypatch.setattr(gpu_check, "run_part", warm_part)
    figures = gpu_check.main(["--out", str(tmp_path), "--tiny", "--budget-s", "1500"])
    assert json.loads((tmp_path / "gpu_check.json").read_text()) == json.loads(json.dumps(figures))
    markdown = (tmp_path / "gpu_check.md").read_text()
    for number, title in enumerate(["Environment", "Teacher", "The trainer's distillation step",
                                    "Data pipeline against the step", "SIGKILL mid-epoch, then resume"], 1):
        assert f"## {number}. {title}" in markdown
    assert figures["environment"]["torch"] == torch.__version__
    if not torch.cuda.is_available():
        assert figures["environment"]["gpu"] == "skipped: no CUDA"
        assert figures["teacher"]["ways"]["bf16_weights"] == {"status": "skipped: no CUDA"}
        assert figures["step_compile"]["status"] == "skipped: no CUDA"
        assert "skipped: no CUDA" in markdown
    assert _positive(figures["teacher"]["ways"]["fp32"]["photos_per_s"])
    assert set(figures["step"]["variants"]) == {"live", "cached"}
    assert figures["step"]["variants"]["live"]["host_syncs_per_step"] == 1
    ratios = figures["data_pipeline"]["pipeline_vs_step"]
    assert set(ratios) == {"folder", "shards_cpu_decode", "shards_device_decode"}
    assert all(_positive(ratio) for by_variant in ratios.values() for ratio in by_variant.values())
    resume = figures["resume"]
    assert resume["exit_codes"]["killed"] != 0 and resume["exit_codes"]["resumed"] == 0
    assert resume["bit_identical"] and resume["max_abs_diff"] == 0.0  # on the CPU, as the resume tests show


def test_gpu_check_stops_a_part_that_overruns_its_budget(tmp_path):
    result = gpu_check.run_part("resume", tmp_path, budget_s=3, tiny=True)
    assert result == {"status": "stopped: over its budget of 3 s", "seconds": 3}


def test_gpu_check_hands_time_a_part_did_not_use_to_the_later_ones(tmp_path, monkeypatch):
    budgets = {}

    def fake_part(name, out, budget_s, tiny):
        budgets[name] = budget_s
        return {"seconds": 0.0}

    monkeypatch.setattr(gpu_check, "run_part", fake_part)
    monkeypatch.setattr(gpu_check, "format_markdown", lambda figures: "")
    gpu_check.check(tmp_path, 1000.0, tiny=True)
    # Parts that take no time leave the whole budget to the next: each gets its share of what is left.
    assert budgets["environment"] == pytest.approx(1000 * gpu_check.BUDGET_SHARES["environment"], rel=1e-3)
    assert budgets["resume"] == pytest.approx(1000.0, rel=1e-3)
    assert budgets["data_pipeline"] == pytest.approx(1000 * 0.12 / 0.40, rel=1e-3)


def test_gpu_check_knows_the_bf16_peaks():
    assert gpu_check.bf16_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert gpu_check.bf16_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu_check.bf16_peak_tflops("Some future GPU") is None


def test_the_benchmarks_v2_small_teacher_gives_a_positive_varying_map():
    """Under transformers' own init the random V2-Small predicted 0 to 1.5e-4 with a third of the
    pixels 0: nothing for bf16-vs-fp32 depth metrics or a distillation run to work with."""
    import torch

    from bench.common import build_teacher

    disparity = build_teacher(False)(torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))).disparity
    assert disparity.min() > 0.01 and disparity.std() / disparity.mean() > 0.01
