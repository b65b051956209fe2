"""Every model on one benchmark, on every process: per-image scores gathered exactly, then averaged;
and the Markdown table of all of them.

Samples go one per step (ground truth keeps its own resolution, which varies within KITTI and
between benchmarks), each read and decoded once for all the models. `gather_for_metrics` drops the
samples Accelerate repeats to even out the shards, so 1 and N processes average the same images.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from trainer.benchmark.models import BenchmarkModel
from trainer.benchmark.readers import BenchmarkDataError, Reader
from trainer.benchmark.suites import Benchmark, Protocol, clip_depth, evaluation_mask
from core.errors import first_line
from core.choices import METRIC_NAMES
from trainer.evaluate.metrics import average_metrics, depth_metrics, disparity_to_depth


class BenchmarkDataset(Dataset):
    """A reader's samples as each model's input plus what they are scored against."""

    def __init__(self, reader: Reader, benchmark: Benchmark, models: list[BenchmarkModel],
                 limit: Optional[int] = None):
        self.reader, self.benchmark = reader, benchmark
        self.prepares = [model.prepare for model in models]
        self.length = len(reader) if limit is None else min(limit, len(reader))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        try:
            sample = self.reader.load(index)
        except BenchmarkDataError:
            raise
        except Exception as error:  # PIL, numpy, h5py: name the file in one line
            raise BenchmarkDataError(f"{self.benchmark.name}: cannot read {self.reader.describe(index)} "
                                     f"({first_line(error)})") from None
        item = {"images": [prepare(sample.image) for prepare in self.prepares],
                "size": torch.tensor([sample.image.height, sample.image.width])}
        if self.benchmark.pairs:
            item["pairs"] = torch.from_numpy(sample.pairs)
        else:
            item["depth"] = torch.from_numpy(sample.depth)
            item["valid"] = evaluation_mask(sample.depth, sample.real, self.benchmark)
        return item


def depth_scores(disparity: torch.Tensor, depth: torch.Tensor, valid: torch.Tensor, benchmark: Benchmark,
                 protocol: Protocol) -> torch.Tensor:
    """(1, len(METRIC_NAMES)) metrics of one image; disparity (1, 1, H, W) at the ground truth's size."""
    per_image = depth_metrics(disparity_to_depth(disparity), depth.view(disparity.shape), valid.view(disparity.shape),
                              align=protocol.align, max_depth=clip_depth(benchmark), min_depth=benchmark.min_depth)
    return torch.stack([per_image[name] for name in METRIC_NAMES], dim=1)


def pair_scores(disparity: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """(1, 2): [pairs ordered right, pairs] of one image. pairs: (K, 4) rows (h_near, w_near, h_far,
    w_far); right means the near point has the larger disparity (a tie is wrong)."""
    plane = disparity[0, 0]  # (H, W)
    near = plane[pairs[:, 0], pairs[:, 1]]
    far = plane[pairs[:, 2], pairs[:, 3]]
    return torch.tensor([[float((near > far).sum()), float(len(pairs))]], device=disparity.device)


def _worker_message(error: Exception) -> str:
    """The one line a DataLoader worker's exception carries (the main process re-raises it as
    'Caught X in DataLoader worker process N. Original Traceback ... X: message')."""
    text = str(error)
    if text.startswith("Caught "):
        last = [line for line in text.splitlines() if line.strip()][-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return first_line(error)


def _summary(table: torch.Tensor, benchmark: Benchmark) -> dict[str, float]:
    """Averages of one model's per-image rows: every name of METRIC_NAMES and num_images for a
    depth benchmark; accuracy, num_pairs and num_images for DA-2K."""
    if benchmark.pairs:
        right, total = table.sum(dim=0).tolist()
        return {"accuracy": right / total if total else math.nan, "num_pairs": int(total), "num_images": len(table)}
    return average_metrics({name: table[:, i] for i, name in enumerate(METRIC_NAMES)})


@torch.no_grad()
def run_benchmark(accelerator: Accelerator, models: list[BenchmarkModel], dataset: BenchmarkDataset,
                  protocol: Protocol, num_workers: int = 2) -> dict[str, dict[str, float]]:
    """{model name: averaged metrics} over `dataset` (built for `models`), the same on every process."""
    benchmark = dataset.benchmark
    loader = accelerator.prepare(DataLoader(dataset, batch_size=1, num_workers=num_workers))
    rows = []
    progress = tqdm(loader, desc=benchmark.title, unit="image", dynamic_ncols=True,
                    disable=not accelerator.is_local_main_process)
    try:
        for batch in progress:
            height, width = batch["size"][0].tolist()
            scores = []
            for model, image in zip(models, batch["images"]):
                disparity = model.predict(image).float().to(accelerator.device)  # (1, 1, h, w)
                # Compared at the ground truth's resolution: the prediction is upsampled, never the truth resampled.
                disparity = F.interpolate(disparity, size=(height, width), mode="bilinear", align_corners=False)
                if benchmark.pairs:
                    scores.append(pair_scores(disparity, batch["pairs"][0]))
                else:
                    scores.append(depth_scores(disparity, batch["depth"], batch["valid"], benchmark, protocol))
            rows.append(accelerator.gather_for_metrics(torch.stack(scores, dim=1)))  # (1, models, scores)
    except BenchmarkDataError as error:  # one raised in a worker arrives with its traceback's text
        raise BenchmarkDataError(_worker_message(error)) from None
    finally:
        progress.close()
    table = torch.cat(rows).double().cpu()  # (images, models, scores)
    return {model.name: _summary(table[:, index], benchmark) for index, model in enumerate(models)}


# --- the report -------------------------------------------------------------------------------

def _columns(benchmarks: list[Benchmark]) -> list[tuple[str, str, str]]:
    """(benchmark name, metric, heading) of every column."""
    columns = []
    for benchmark in benchmarks:
        if benchmark.pairs:
            columns.append((benchmark.name, "accuracy", f"{benchmark.title} acc ↑"))
        else:
            columns += [(benchmark.name, "abs_rel", f"{benchmark.title} AbsRel ↓"),
                        (benchmark.name, "delta1", f"{benchmark.title} δ1 ↑")]
    return columns


def gaps(results: dict[str, dict[str, dict[str, float]]], models: list[BenchmarkModel]) -> dict[str, dict]:
    """{student: {"teacher": name, benchmark: {metric: student - teacher}}} for the table's metrics,
    against the first teacher given; empty without a teacher or a student."""
    teachers = [model.name for model in models if model.is_teacher]
    if not teachers:
        return {}
    teacher = results[teachers[0]]
    found = {}
    for model in models:
        if model.is_teacher:
            continue
        found[model.name] = {"teacher": teachers[0]}
        for benchmark, metrics in results[model.name].items():
            found[model.name][benchmark] = {name: metrics[name] - teacher[benchmark][name]
                                            for name in ("abs_rel", "delta1", "accuracy") if name in metrics}
    return found


def format_table(results: dict[str, dict[str, dict[str, float]]], models: list[BenchmarkModel],
                 benchmarks: list[Benchmark], protocol: Protocol) -> str:
    """One Markdown table: a row per model, then a row per student with its gap to the teacher."""
    columns = _columns(benchmarks)
    lines = [f"Protocol: {protocol.name} ({protocol.definition}; {protocol.source}).", "",
             "| model | " + " | ".join(heading for _, _, heading in columns) + " |",
             "| --- |" + " ---: |" * len(columns)]
    for model in models:
        cells = [f"{results[model.name][name][metric]:.3f}" for name, metric, _ in columns]
        lines.append(f"| {model.name} | " + " | ".join(cells) + " |")
    for student, gap in gaps(results, models).items():
        cells = [f"{gap[name][metric]:+.3f}" for name, metric, _ in columns]
        lines.append(f"| gap: {student} − {gap['teacher']} | " + " | ".join(cells) + " |")
    counts = []
    for benchmark in benchmarks:
        first = results[models[0].name][benchmark.name]
        counted = f"{first['num_images']} images"
        if benchmark.pairs:
            counted += f", {first['num_pairs']} pairs"
        counts.append(f"{benchmark.title} {counted}")
    lines += ["", "Evaluated: " + "; ".join(counts) + "."]
    return "\n".join(lines)
