"""Train the world teacher: a Depth Anything V2 model that knows the synthetic world's depth.

    python -m bench.world_teacher --out bench/world_teacher

Pretrained depth weights cannot be downloaded here, so the quality run (`bench.quality`) needs a
teacher whose knowledge is built in the open: this one is trained from scratch on the `train`
world's exact depth (`data.synthetic`), and from then on plays Depth-Anything-V2's role. It is the
real architecture through `transformers` (DepthAnythingForDepthEstimation: a DINOv2 backbone, the
DPT neck and head), only narrower and shallower, saved with `save_pretrained`, so
`teacher.name=bench/world_teacher` loads it exactly like a hub teacher.

The recipe:
- data: every step renders new scenes (`render_sample(seed, "train", index)`, index = step x batch
  + position), so the teacher never sees a scene twice and a sample depends only on its index;
- target: disparity 1 / depth, and 0 where the world says "no depth" (sky, beyond 40 m), as
  Depth Anything V2 is taught to call the sky infinitely far;
- loss: the project's scale-and-shift-invariant L1 (`losses.SSILoss`) plus 0.5 x the multi-scale
  gradient loss on median/MAD-normalised maps (`losses.GradientLoss`), the terms a student uses;
- AdamW, linear warm-up then cosine decay over a fixed number of steps (never wall clock).

Reproducible bit for bit on the same torch version and thread count (`--threads`): one seed sets
the weights, the data is a function of the step, and a checkpoint every `--save-every` steps
(weights, optimizer, step) lets an interrupted run resume to the same bytes. The shipped weights
are stored in float16 (half the size; the config keeps float32, so they load as float32).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import transformers
from torch.utils.data import DataLoader, Dataset
from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

from data.synthetic import render_sample
from core.normalization import IMAGENET_MEAN, IMAGENET_STD
from losses import GradientLoss, SSILoss, normalize_disparity
from modeling.teacher import init_random
from core.cli import ArgumentParser
from trainer.evaluate.metrics import depth_to_disparity

SHIPPED = Path(__file__).resolve().parent / "world_teacher"
CHECKPOINT = "checkpoint.pt"  # the training state, while a run is unfinished
OUR_FILES = {"config.json", "model.safetensors", "recipe.json", CHECKPOINT, CHECKPOINT + ".partial"}
INPUT_SIZE = 126  # 9 x 9 patches of 14 px: the size the teacher is trained and distilled at


def world_teacher_config() -> DepthAnythingConfig:
    """Depth Anything V2's architecture at 2.3 M parameters (V2-Small: 24.8 M)."""
    backbone = Dinov2Config(hidden_size=128, num_hidden_layers=6, num_attention_heads=4, intermediate_size=512,
                            image_size=INPUT_SIZE, out_indices=[1, 3, 4, 6], reshape_hidden_states=False)
    return DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=128,
                               neck_hidden_sizes=[32, 64, 128, 128], fusion_hidden_size=64, head_hidden_size=32)


@dataclass(frozen=True)
class Recipe:
    seed: int = 0
    steps: int = 3000
    batch_size: int = 16
    lr: float = 5e-4
    weight_decay: float = 0.05
    warmup_steps: int = 200
    gradient_weight: float = 0.5
    size: int = INPUT_SIZE
    threads: int = 2  # torch's CPU kernels split their sums by thread: another count, other bits


class RenderedWorld(Dataset):
    """Sample `index` of the train world: (ImageNet-normalised image, disparity target)."""

    def __init__(self, seed: int, size: int):
        self.seed, self.size = seed, size
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return 2 ** 31

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, depth = render_sample(self.seed, "train", index, self.size, self.size)
        image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255
        depth = torch.from_numpy(depth)[None]
        return (image - self.mean) / self.std, depth_to_disparity(depth)


def _one_thread(_worker: int) -> None:
    torch.set_num_threads(1)


def learning_rate(recipe: Recipe, step: int) -> float:
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return recipe.lr * 0.5 * (1 + math.cos(math.pi * progress))


def loss_fn(recipe: Recipe, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    ssi = SSILoss()(prediction, target)
    gradient = GradientLoss()(normalize_disparity(prediction, "median_mad"), normalize_disparity(target, "median_mad"))
    return ssi + recipe.gradient_weight * gradient


def build_model(recipe: Recipe) -> DepthAnythingForDepthEstimation:
    torch.manual_seed(recipe.seed)
    model = DepthAnythingForDepthEstimation(world_teacher_config())
    torch.manual_seed(recipe.seed)
    init_random(model)  # every weight from this seed, whatever transformers' own init drew
    return model


def _save_checkpoint(path: Path, model, optimizer, step: int, recipe: Recipe) -> None:
    partial = path.with_name(path.name + ".partial")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "recipe": asdict(recipe)}, partial)
    os.replace(partial, path)


def train(out: Path, recipe: Recipe, save_every: int = 100, workers: int = 1,
          log_every: int = 25) -> DepthAnythingForDepthEstimation:
    """Train (or resume) the teacher in `out` under the recipe's thread count -> the model, eval mode."""
    threads = torch.get_num_threads()
    torch.set_num_threads(recipe.threads)
    try:
        return _train(out, recipe, save_every, workers, log_every)
    finally:
        torch.set_num_threads(threads)


def _train(out: Path, recipe: Recipe, save_every: int, workers: int, log_every: int) -> DepthAnythingForDepthEstimation:
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = out / CHECKPOINT
    model = build_model(recipe)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    start = 0
    if checkpoint.exists():
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        if state["recipe"] != asdict(recipe):
            raise SystemExit(f"error: {checkpoint} was written by another recipe ({state['recipe']}); "
                             f"give another --out or the same settings")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]
        print(f"resuming at step {start}", flush=True)
    model.train()
    dataset = RenderedWorld(recipe.seed, recipe.size)
    indices = range(start * recipe.batch_size, recipe.steps * recipe.batch_size)
    loader = DataLoader(dataset, batch_size=recipe.batch_size, sampler=indices, num_workers=workers,
                        worker_init_fn=_one_thread, prefetch_factor=4 if workers else None)
    started, seen, running, logged_steps = time.perf_counter(), 0, 0.0, 0
    for step, (images, target) in enumerate(loader, start=start):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(recipe, step)
        prediction = model(pixel_values=images).predicted_depth.unsqueeze(1)
        loss = loss_fn(recipe, prediction, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        seen += len(images)
        running, logged_steps = running + loss.item(), logged_steps + 1
        if (step + 1) % log_every == 0:
            rate = seen / (time.perf_counter() - started)
            print(f"step {step + 1}/{recipe.steps} loss {running / logged_steps:.4f} "
                  f"lr {learning_rate(recipe, step):.2e} {rate:.1f} img/s", flush=True)
            running, logged_steps = 0.0, 0
        if (step + 1) % save_every == 0 or step + 1 == recipe.steps:
            _save_checkpoint(checkpoint, model, optimizer, step + 1, recipe)
    return model.eval()


def save_shipped(model: DepthAnythingForDepthEstimation, out: Path, recipe: Recipe) -> None:
    """config.json + model.safetensors (float16 tensors: half the size; the config says float32,
    so `from_pretrained` gives a float32 model) + recipe.json (how it was made, and with what); the
    finished run's checkpoint goes (a rerun starts from step 0 and reproduces these bytes)."""
    half = {name: tensor.half() for name, tensor in model.state_dict().items()}
    model.save_pretrained(out, state_dict=half)
    made_with = {"torch": torch.__version__, "transformers": transformers.__version__}
    (out / "recipe.json").write_text(json.dumps({**asdict(recipe), "made_with": made_with}, indent=2) + "\n")
    (out / CHECKPOINT).unlink(missing_ok=True)


def out_problem(out: Path) -> Optional[str]:
    """Why `out` cannot take a teacher: it holds files this command did not write."""
    if out.exists() and not out.is_dir():
        return f"--out {out} is a file; give a folder"
    others = sorted(p.name for p in out.iterdir() if p.name not in OUR_FILES) if out.is_dir() else []
    if others:
        return (f"--out {out} holds files this command did not write ({', '.join(others[:3])}); "
                f"choose an empty or new folder")
    return None


def main(argv: Optional[list[str]] = None) -> int:
    parser = ArgumentParser(prog="python -m bench.world_teacher", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=SHIPPED, help="folder for the weights (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=Recipe.steps)
    parser.add_argument("--seed", type=int, default=Recipe.seed)
    parser.add_argument("--threads", type=int, default=Recipe.threads, help="torch threads; the result depends on it")
    parser.add_argument("--workers", type=int, default=1, help="rendering processes (do not change the result)")
    parser.add_argument("--save-every", type=int, default=100)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.threads < 1 or args.workers < 0 or args.save_every < 1:
        parser.error("--steps, --threads and --save-every must be at least 1, --workers at least 0")
    problem = out_problem(args.out)
    if problem:
        parser.error(problem)
    recipe = Recipe(seed=args.seed, steps=args.steps, threads=args.threads)
    model = train(args.out, recipe, save_every=args.save_every, workers=args.workers)
    save_shipped(model, args.out, recipe)
    print(f"saved {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
