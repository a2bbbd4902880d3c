"""Seconds to prepare one phantom study for training (read the DICOM series, resample it and its
bleed masks to the model grid), and what the mask resampling costs with each bit resampled on
every slice (as before 2026-12-04) against only on the slices where the bit is set (now).

    .venv/bin/python bench/prepare.py [--studies 12] [--size 128 --spacing 2.0]

Writes --studies random phantom studies (large bleeds, so every positive one has masks) into a
temporary folder, then prints the median per study of prepare_study and of both mask
resamplings. The two mask results are compared and must be equal.
"""

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from inference import dicom_io
from inference.data import _masks_in_series_order, prepare_study
from inference.datasets import read_phantom_dataset
from inference.phantom import write_dataset
from inference.preprocess import PreprocessConfig, _sample, resample_inplane, resample_mask


def every_plane(mask: np.ndarray, transform, size: int) -> np.ndarray:
    """The earlier resampling: each of the 8 bit planes over every slice."""
    out = np.zeros((mask.shape[0], size, size), dtype=np.uint8)
    for bit in range(8):
        plane = torch.from_numpy(((mask >> bit) & 1).astype(np.float32))
        sampled = _sample(plane, transform, size, air=0.0) > 0.5
        out |= sampled.numpy().astype(np.uint8) << np.uint8(bit)
    return out


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def timed(fn, *args):
    started = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=12)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--spacing", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = PreprocessConfig(image_size=args.size, spacing_mm=args.spacing)
    print(
        f"# {cpu_name()}, {os.cpu_count()} cores, "
        f"{args.threads} thread(s), torch {torch.__version__}, grid {args.size} px at "
        f"{args.spacing} mm"
    )
    with tempfile.TemporaryDirectory() as tmp:
        write_dataset(Path(tmp), args.studies, seed=1005, progress=False, min_size="large")
        whole, old, new = [], [], []
        for item in read_phantom_dataset(tmp):
            seconds, _ = timed(prepare_study, item, config, "phantom")
            whole.append(seconds)
            series = dicom_io.load_series(item.paths)
            _, transform = resample_inplane(series.hu, series.pixel_spacing_mm, config)
            masks = _masks_in_series_order(Path(item.masks_path), series.sop_instance_uids)
            if masks is None or not masks.any():
                continue
            t_old, before = timed(every_plane, masks, transform, args.size)
            t_new, now = timed(resample_mask, masks, transform, args.size)
            if not np.array_equal(before, now):
                raise SystemExit(f"{item.study_id}: the two resamplings differ")
            old.append(t_old)
            new.append(t_new)
    print(f"prepare_study: median {statistics.median(whole):.3f} s per study ({len(whole)})")
    if old:
        print(
            f"mask resampling, every slice per bit: median {statistics.median(old):.3f} s; "
            f"only slices with the bit: {statistics.median(new):.3f} s ({len(old)} masked "
            "studies, identical masks)"
        )


if __name__ == "__main__":
    main()
