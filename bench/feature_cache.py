"""What the feature cache saves `ich convexity`: the ensemble's calibrated study scores of the
fit studies (``Predictor.ensemble_logits``) without a cache, with an empty one (computed and
written) and with a full one (read), per study, and the size of an entry on disk.

    .venv/bin/python bench/feature_cache.py               # 4 phantom studies, shipped model, CPU
    .venv/bin/python bench/feature_cache.py --studies 8 --threads 1

Prints a table and one JSON line. Figures go to docs/benchmarks.md with the machine they ran on.
"""

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=4)
    parser.add_argument("--seed", type=int, default=4242)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    parser.add_argument("--model", default=None, help="model package (default: the shipped one)")
    args = parser.parse_args()

    import numpy as np
    import torch

    from inference.dicom_io import load_series
    from inference.feature_cache import FeatureCache
    from inference.phantom import write_dataset
    from inference.predictor import Predictor

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_dataset(root / "data", args.studies, seed=args.seed, progress=False)
        folders = sorted(d for d in (root / "data").iterdir() if d.is_dir())
        series = [load_series(sorted(d.glob("*.dcm"))) for d in folders]
        predictor = Predictor.load(args.model, device="cpu")
        predictor.ensemble_logits(series[0])  # folds the networks, warms the allocator
        cache = FeatureCache(root / "cache")
        seconds: dict[str, list[float]] = {"no cache": [], "empty cache": [], "full cache": []}
        scores: dict[str, list[np.ndarray]] = {k: [] for k in seconds}
        for name, used in (("no cache", None), ("empty cache", cache), ("full cache", cache)):
            for one in series:
                started = time.perf_counter()
                scores[name].append(predictor.ensemble_logits(one, cache=used))
                seconds[name].append(time.perf_counter() - started)
        entries = list((root / "cache").glob("*/*.npy"))
        entry_kb = statistics.mean(p.stat().st_size for p in entries) / 1024
        same = all(
            np.array_equal(a, b)
            for a, b in zip(scores["no cache"], scores["full cache"], strict=True)
        )
    slices = statistics.mean(len(s.hu) for s in series)
    print(f"{len(series)} phantom studies of {slices:.0f} slices on average ({platform.machine()})")
    print(f"torch threads {torch.get_num_threads()}; seconds per study (median):")
    for name, values in seconds.items():
        print(f"  {name:12s} {statistics.median(values):7.3f}")
    print(f"an entry: {entry_kb:.0f} KB; scores read from the cache equal the computed: {same}")
    print(
        json.dumps(
            {
                "studies": len(series),
                "mean_slices": slices,
                "threads": torch.get_num_threads(),
                "median_seconds": {k: statistics.median(v) for k, v in seconds.items()},
                "entry_kb": entry_kb,
                "same_scores": same,
            }
        )
    )


if __name__ == "__main__":
    main()
