"""Parameters and forward FLOPs of the real architectures, part by part (random weights; nothing is
downloaded).

    python -m modeling.summary [--decoders lean,dpt] [--backbone mobilevit_xs] [--size 256]
        [--teacher-size 518]

For each student decoder preset: every encoder stage and every decoder stage (reassemble, the
fusion at each stride, the head), then the whole student; then the teacher (Depth-Anything-V2-
Small) at `--teacher-size` and at the student's size rounded to its patch (252 for 256). FLOPs
count a multiply-add as 2, over convolutions and matrix products (torch's FlopCounterMode), batch 1.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Optional

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import DepthAnythingForDepthEstimation

from core.choices import DECODERS, TEACHER_MULTIPLE
from modeling.student import StudentDepthModel
from modeling.teacher import small_config
from core.cli import comma_choices


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def gflops(model: Callable, *inputs) -> float:
    """Forward FLOPs of `model(*inputs)` in billions."""
    return gflops_by_module(model, *inputs)[""]


def gflops_by_module(model: Callable, *inputs) -> dict[str, float]:
    """GFLOPs of one forward pass per submodule name ('encoder.stages_1', ...); '' is the total."""
    with torch.inference_mode(), FlopCounterMode(display=False, depth=None) as counter:
        model(*inputs)
    by_module = {}
    for name, per_op in counter.get_flop_counts().items():
        if name == "Global":
            continue
        _, _, relative = name.partition(".")  # drop the root's class name
        by_module[relative] = sum(per_op.values()) / 1e9
    return by_module


def _output_strides(encoder: nn.Module, size: int) -> dict[str, int]:
    """Input side / output side of each top-level encoder block."""
    strides, hooks = {}, []
    for name, block in encoder.named_children():
        hooks.append(block.register_forward_hook(
            lambda _module, _inputs, output, name=name: strides.__setitem__(name, size // output.shape[-1])))
    try:
        with torch.inference_mode():
            encoder(torch.zeros(1, 3, size, size))
    finally:
        for hook in hooks:
            hook.remove()
    return strides


def student_parts(student: StudentDepthModel, size: int) -> list[tuple[str, int, float]]:
    """(part, parameters, GFLOPs) of `student` at size x size: the encoder and its blocks, the
    decoder and its stages, the whole student."""
    flops = gflops_by_module(student, torch.zeros(1, 3, size, size))
    modules = dict(student.named_modules())
    rows = [("encoder", count(student.encoder), flops["encoder"])]
    for name, stride in _output_strides(student.encoder, size).items():
        rows.append((f"  {name} (to stride {stride})", count(modules[f"encoder.{name}"]),
                     flops.get(f"encoder.{name}", 0.0)))
    decoder = student.decoder
    rows.append(("decoder", count(decoder), flops["decoder"]))
    # A ModuleList is never called itself: its FLOPs are its children's.
    reassemble = sum(flops.get(f"decoder.reassemble.{index}", 0.0) for index in range(len(decoder.reassemble)))
    rows.append(("  reassemble (1x1 per stage)", count(decoder.reassemble), reassemble))
    for index in reversed(range(len(decoder.fusion))):  # stride 32 first, as the data flows
        rows.append((f"  fusion at stride {4 * 2 ** index}", count(decoder.fusion[index]),
                     flops[f"decoder.fusion.{index}"]))
    rows.append(("  head (upsampling to full size)", count(decoder.head), flops["decoder.head"]))
    rows.append(("student", count(student), flops[""]))
    return rows


def teacher_gflops(teacher: nn.Module, size: int) -> float:
    return gflops_by_module(teacher, torch.zeros(1, 3, size, size))[""]


def same_size_as_teacher(size: int) -> int:
    """The teacher's input side nearest below-or-at `size` (a multiple of its 14-pixel patch)."""
    return size // TEACHER_MULTIPLE * TEACHER_MULTIPLE


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m modeling.summary", description=__doc__.split("\n\n")[0])
    parser.add_argument("--decoders", default=",".join(DECODERS), help="presets, comma-separated")
    parser.add_argument("--backbone", default="mobilevit_xs")
    parser.add_argument("--size", type=int, default=256, help="student input side, a multiple of 32")
    parser.add_argument("--teacher-size", type=int, default=518, help="a multiple of 14")
    args = parser.parse_args(argv)
    decoders = comma_choices(parser, "--decoders", args.decoders, DECODERS)

    teacher = DepthAnythingForDepthEstimation(small_config()).eval()
    teacher_params = count(teacher)
    sizes = dict.fromkeys((args.teacher_size, same_size_as_teacher(args.size)))
    teacher_flops = {size: teacher_gflops(teacher, size) for size in sizes}
    for decoder in decoders:
        student = StudentDepthModel(backbone=args.backbone, decoder=decoder).eval()
        rows = student_parts(student, args.size)
        width = max(len(name) for name, _, _ in rows)
        print(f"{args.backbone} + {decoder} decoder at {args.size}x{args.size}")
        print(f"{'part':<{width}}  {'params':>9}  {'GFLOPs':>7}")
        for name, params, flops in rows:
            print(f"{name:<{width}}  {params / 1e6:7.3f} M  {flops:7.3f}")
        student_params, student_flops = rows[-1][1], rows[-1][2]
        for size, flops in teacher_flops.items():
            print(f"teacher (Depth-Anything-V2-Small, {teacher_params / 1e6:.3f} M) at {size}x{size}: {flops:.2f} "
                  f"GFLOPs = {flops / student_flops:.1f}x the student; {teacher_params / student_params:.1f}x "
                  f"its parameters")
        print()


if __name__ == "__main__":
    main()
