"""The benchmarks run end to end at tiny settings and write their figures. No timing is asserted:
only that every figure is there, positive and finite."""

import json
import math

from bench import dataloader, inference, train_step

TINY_SIZES = ["--teacher-size", "42", "--student-size", "64"]


def _positive(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def test_train_step_times_live_and_cached_steps(tmp_path):
    path = tmp_path / "train_step.json"
    train_step.main([*TINY_SIZES, "--tiny", "--batch-size", "2", "--steps", "1", "--warmup", "1", "--threads", "1",
                     "--variants", "live,cached", "--json", str(path)])
    figures = json.loads(path.read_text())
    assert _positive(figures["cached_speedup_vs_live"]) and _positive(figures["cached_speedup_vs_live_excluding_data"])
    live, cached = figures["variants"]["live"], figures["variants"]["cached"]
    assert live["dataset"] == "UnlabeledImageDataset" and cached["dataset"] == "CachedTeacherDataset"
    # The comparison is fair: the same depth-only loss on both sides.
    assert live["loss_weights"] == cached["loss_weights"] == {"silog": 1.0, "gradient": 0.5}
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


def test_inference_compares_teacher_student_and_int8(tmp_path):
    path = tmp_path / "inference.json"
    inference.main(["--tiny", "--teacher-size", "42", "--student-size", "64", "--threads", "1", "--rounds", "2",
                    "--student-runs", "1", "--warmup", "1", "--quant-modes", "dynamic", "--json", str(path)])
    figures = json.loads(path.read_text())
    assert _positive(figures["student_speedup_vs_teacher"])
    assert set(figures["latency"]) == {"teacher_pytorch_fp32", "student_onnx_fp32", "student_onnx_int8_dynamic"}
    for stats in figures["latency"].values():
        assert stats["runs"] == 2 and 0 < stats["p10_ms"] <= stats["median_ms"] <= stats["p90_ms"]
    int8 = figures["int8"]["dynamic"]
    assert _positive(int8["speedup_vs_fp32_student"]) and int8["num_images"] == 8
    assert 0 <= int8["aligned_abs_rel"] < 1 and 0 < int8["aligned_delta1"] <= 1
    assert figures["settings"]["torch_threads"] == figures["settings"]["ort_intra_op_threads"] == 1


def test_dataloader_compares_with_the_step(tmp_path):
    step = {"settings": {"teacher_size": 42, "student_size": 64},
            "variants": {"live": {"dataset": "UnlabeledImageDataset", "images_per_s_excluding_data": 2.0},
                         "cached": {"dataset": "CachedTeacherDataset", "images_per_s_excluding_data": 8.0}}}
    (tmp_path / "step.json").write_text(json.dumps(step))
    path = tmp_path / "dataloader.json"
    dataloader.main([*TINY_SIZES, "--batch-size", "2", "--workers", "0", "--items", "6",
                     "--step-json", str(tmp_path / "step.json"), "--json", str(path)])
    figures = json.loads(path.read_text())
    assert _positive(figures["images_per_s"]) and _positive(figures["images_per_s_with_startup"])
    # Only the live step reads this pipeline; the cached one has its own dataset.
    assert set(figures["pipeline_vs_step_by_variant"]) == {"live"}
    assert math.isclose(figures["pipeline_vs_step"], figures["images_per_s"] / 2.0)
