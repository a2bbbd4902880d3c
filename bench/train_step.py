"""Seconds per training step of one slice network, with and without channels-last memory.

    .venv/bin/python bench/train_step.py                          # Lite0, 256 and 384 px
    .venv/bin/python bench/train_step.py --arch efficientnet_lite1 --sizes 256 --batch 32

One step is what `ich train` does per batch: forward to the last stage, the classification loss,
the attention term on the class evidence maps, backward and an AdamW update. Random inputs and
labels (the time does not depend on them), random initial weights, output stride 16 like the
shipped model. Prints the median of --repeat steps after one warm-up step, per size and memory
format. Data loading and augmentation are not counted.
"""

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from inference.models import build_slice_model


def step_seconds(arch: str, size: int, batch: int, channels_last: bool, repeat: int) -> float:
    torch.manual_seed(0)
    model = build_slice_model(arch, pretrained=False, output_stride=16).train()
    model.channels_last = channels_last
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.rand(batch, 3, size, size)
    y = (torch.rand(batch, 6) > 0.5).float()
    times = []
    for _ in range(repeat + 1):
        started = time.perf_counter()
        features = model.forward_features(x)
        loss = F.binary_cross_entropy_with_logits(model.forward_head(features), y)
        loss = loss + 0.5 * model.forward_maps(features).flatten(2).logsumexp(-1).mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="efficientnet_lite0")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 384])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"{torch.get_num_threads()} torch threads; {args.arch}, batch {args.batch}"
    )
    for size in args.sizes:
        nchw = step_seconds(args.arch, size, args.batch, False, args.repeat)
        nhwc = step_seconds(args.arch, size, args.batch, True, args.repeat)
        print(
            f"{size:>4} px: NCHW {nchw:.2f} s/step, channels-last {nhwc:.2f} s/step "
            f"({nchw / nhwc:.2f} times faster)"
        )


if __name__ == "__main__":
    main()
