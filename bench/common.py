"""What the benchmarks share: the real configuration and models, timing statistics, memory, the
machine's description, one table format and the JSON file."""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import numpy as np
import psutil
import torch
from torch.utils.data import Dataset
from transformers import DepthAnythingForDepthEstimation

from modeling import DepthAnythingTeacher, StudentDepthModel
from modeling.teacher import init_random, small_config
from trainer.config import Config, load_config

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "data" / "samples"
# The real run's preset: its augmentation, loss weights, optimizer and student widths are what we time.
REAL_PRESET = REPO / "trainer" / "configs" / "dav2_small_mobilevit_xs.yaml"


def bench_config(teacher_size: int, student_size: int, batch_size: int, workers: int, tiny: bool,
                 *overrides: str) -> Config:
    """The real preset on the shipped sample photos, with random-init models (nothing downloaded)."""
    return load_config(REAL_PRESET, [
        f"data.train_dir={SAMPLES}", "data.val_fraction=0.0", f"data.teacher_size={teacher_size}",
        f"data.student_size={student_size}", f"data.num_workers={workers}", f"train.batch_size={batch_size}",
        f"eval.batch_size={batch_size}", f"teacher.name={'tiny' if tiny else 'small'}",
        "student.pretrained=false", "train.mixed_precision='no'", *overrides])


# The students the benchmarks compare, by the names RESULTS.md uses: `lean` is the default student
# (trainer/config.py's StudentConfig: MobileViT-XS + the lean decoder), `dpt64` the first student
# (MobileViT-XS + MiniDPT), `lean_mnv4s` the lean decoder on timm's MobileNetV4-Conv-Small, a
# cheaper encoder (`student.backbone=mobilenetv4_conv_small`).
STUDENT_PRESETS = {"lean": {"decoder": "lean"}, "dpt64": {"decoder": "dpt", "decoder_width": 64, "head_width": 32},
                   "lean_mnv4s": {"backbone": "mobilenetv4_conv_small", "decoder": "lean"}}
DEFAULT_PRESET = "lean"


def build_student_preset(name: str, seed: int = 0) -> StudentDepthModel:
    """The student of preset `name`, random weights from `seed`, eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return StudentDepthModel(**STUDENT_PRESETS[name]).eval()


def build_teacher(tiny: bool) -> DepthAnythingTeacher:
    """Depth-Anything-V2-Small built from its config (random weights), or the tiny test teacher."""
    if tiny:
        return DepthAnythingTeacher.tiny()
    with torch.random.fork_rng(devices=[]):
        model = DepthAnythingForDepthEstimation(small_config())
        torch.manual_seed(0)
        init_random(model)  # a positive, varying map, as the tiny teacher gives
        return DepthAnythingTeacher(model)


class Cycled(Dataset):
    """`dataset` repeated to `length` items: the eight sample photos stand for a large folder."""

    def __init__(self, dataset: Dataset, length: int):
        self.dataset, self.length = dataset, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        return self.dataset[index % len(self.dataset)]


def trainer_step(cfg: Config, accelerator, teacher: DepthAnythingTeacher, steps: int,
                 student: Optional[StudentDepthModel] = None):
    """The trainer's own `DistillationStep` for `cfg` (student: `build_student(cfg)` seeded with
    cfg.seed unless given), its batches for `steps` steps on the trainer's own dataset and loader,
    prepared as the trainer prepares them, and the dataset's class name."""
    from trainer.train.distill import build_module, build_optimizer, build_scheduler, build_student
    from trainer.train.inputs import Targets, batch_finisher, build_datasets, build_loaders, select_photos
    from trainer.train.loop import DistillationStep, Progress

    if student is None:
        torch.manual_seed(cfg.seed)  # every variant starts from the same student
        student = build_student(cfg)
    targets = Targets.of(cfg)
    module = build_module(cfg, student, teacher, with_features=targets.has_features).to(accelerator.device).train()
    optimizer = build_optimizer(cfg, module)
    progress = Progress()
    progress.plan(cfg, cfg.train.batch_size, steps_per_epoch=steps)
    scheduler = build_scheduler(cfg, optimizer, progress.schedule_position)
    photos = select_photos(cfg)
    train, _, _ = build_datasets(cfg, teacher, targets, photos)
    loader, _, _ = build_loaders(cfg, accelerator, Cycled(train, steps * cfg.train.batch_size), None, None)
    step = DistillationStep(cfg, accelerator, module, teacher, targets, optimizer, scheduler, progress,
                            photos_per_step=cfg.train.batch_size,
                            finish_batch=batch_finisher(train, accelerator.device))
    return step, iter(accelerator.prepare(loader)), type(train.dataset).__name__


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class HostSyncCounter:
    """Counts the host synchronisations the project's own code makes while active.

    On CUDA: every synchronising call PyTorch reports in its sync debug mode. On the CPU, where
    nothing is asynchronous, the same reads counted where they would synchronise a GPU: a tensor
    turned into a Python value (`item`, `tolist`, `bool`, `float`, `int`, `numpy`) by code under the
    project's own folders (the optimizer's CPU step counters and library internals are not counted)."""

    READS = ("item", "tolist", "__bool__", "__float__", "__int__", "numpy")
    PROJECT = tuple(str(Path(__file__).resolve().parents[1] / part) for part in ("trainer", "losses", "modeling",
                                                                                 "data"))

    def __init__(self, device: torch.device):
        self.device, self.count, self._saved = device, 0, {}

    def __enter__(self) -> "HostSyncCounter":
        if self.device.type == "cuda":
            self._warnings = warnings.catch_warnings(record=True)
            self._caught = self._warnings.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            return self
        for name in self.READS:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original
            setattr(torch.Tensor, name, self._counting(original))
        return self

    def _counting(self, original):
        counter = self

        def read(tensor, *args, **kwargs):
            if sys._getframe(1).f_code.co_filename.startswith(counter.PROJECT):
                counter.count += 1
            return original(tensor, *args, **kwargs)
        return read

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
            self.count += sum("synchroniz" in str(w.message) for w in self._caught)
            self._warnings.__exit__(*exc)
            return
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)


def latency_stats(seconds: Sequence[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1e3
    return {"median_ms": float(np.median(ms)), "p10_ms": float(np.percentile(ms, 10)),
            "p90_ms": float(np.percentile(ms, 90)), "runs": len(ms)}


def current_rss() -> int:
    """Bytes resident in this process now."""
    return psutil.Process().memory_info().rss


class PeakRss:
    """Peak resident memory of this process between `take()` calls, sampled every few ms.

    `ru_maxrss` is a peak over the whole process life and cannot be reset, so it cannot tell
    interleaved variants apart; a sampling thread can (torch kernels release the GIL)."""

    def __init__(self, interval_s: float = 0.005):
        self.process, self.interval_s = psutil.Process(), interval_s
        self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def take(self) -> int:
        """Bytes: the peak since the previous call."""
        peak = max(self.peak, self.process.memory_info().rss)
        self.peak = self.process.memory_info().rss
        return peak

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: Optional[torch.device] = None) -> dict:
    """Where and with what a figure was measured; load above the core count means other work ran."""
    import onnxruntime

    info = {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cpu": cpu_model(), "logical_cpus": os.cpu_count(), "load_average_1_5_15": list(os.getloadavg()),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__}
    if device is not None and device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def format_table(title: str, headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A plain fixed-width table; floats get 4 significant digits."""
    cells = [[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = lambda values: " | ".join(v.rjust(w) for v, w in zip(values, widths))  # noqa: E731
    return "\n".join([title, line(headers), "-+-".join("-" * w for w in widths), *map(line, cells)])


def write_json(path: Optional[str | Path], figures: dict) -> None:
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"wrote {path}")
