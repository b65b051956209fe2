"""Parameter counts of the real architectures (random weights; nothing is downloaded).

    python -m modeling.summary [--backbone mobilevit_xs] [--decoder-width 64]
"""

from __future__ import annotations

import argparse

from torch import nn
from transformers import DepthAnythingForDepthEstimation

from modeling.student import StudentDepthModel
from modeling.teacher import small_config


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def summary(backbone: str = "mobilevit_xs", decoder_width: int = 64, head_width: int = 32) -> dict[str, int]:
    teacher = DepthAnythingForDepthEstimation(small_config())
    student = StudentDepthModel(backbone=backbone, decoder_width=decoder_width, head_width=head_width)
    return {
        "teacher (Depth-Anything-V2-Small)": count(teacher),
        f"student ({backbone} + MiniDPT w{decoder_width})": count(student),
        "  student encoder": count(student.encoder),
        "  student decoder": count(student.decoder),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m modeling.summary", description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="mobilevit_xs")
    parser.add_argument("--decoder-width", type=int, default=64)
    parser.add_argument("--head-width", type=int, default=32)
    args = parser.parse_args(argv)
    counts = summary(args.backbone, args.decoder_width, args.head_width)
    width = max(map(len, counts))
    for name, params in counts.items():
        print(f"{name:<{width}}  {params / 1e6:7.3f} M")
    teacher, student = list(counts.values())[:2]
    print(f"{'teacher / student':<{width}}  {teacher / student:7.1f} x")


if __name__ == "__main__":
    main()
