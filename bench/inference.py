"""Per-stage timings and peak memory of one study through the Predictor.

    .venv/bin/python bench/inference.py                 # 40 and 500 slices, shipped model, CPU
    .venv/bin/python bench/inference.py --device cuda   # on a GPU machine
    .venv/bin/python bench/inference.py --nchw          # without channels-last memory (A/B)
    .venv/bin/python bench/inference.py --unfused       # without fused convolutions (A/B)
    .venv/bin/python bench/inference.py --grid 384,0.625  # the same weights on another grid

Each study size runs in its own process so its peak memory (max RSS) is its own: what a worker
needs to read and predict the series. A separate process writes the synthetic series first, so
the phantom's generation (over 2 GB of float64 for 500 slices) is not counted. Prints a table
and one JSON line per run. Figures go to docs/benchmarks.md with the machine they ran on.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def write(args: argparse.Namespace) -> None:
    """Write the benchmark series as DICOM into args.write."""
    import numpy as np

    from inference.phantom import generate_study, write_study

    slices = args.slices[0]
    study = generate_study(
        args.seed,
        subtypes=["subdural", "intraparenchymal"],
        size="medium",
        n_slices=min(slices, 40),
    )
    if slices > len(study.hu):
        study = _resliced(study, slices, np)
    write_study(study, Path(args.write))


def child(args: argparse.Namespace) -> None:
    import torch

    from inference.dicom_io import load_series
    from inference.predictor import Predictor

    started = time.perf_counter()
    series = load_series(Path(args.series))
    read_s = time.perf_counter() - started
    predictor = Predictor.load(args.model, device=args.device)
    for member in predictor.package.members:
        member.channels_last = not args.nchw
    if args.nchw:  # the folded CPU networks keep channels-last weights: make them NCHW too
        for network in predictor.networks():
            for parameter in network.parameters():
                if parameter.dim() == 4:
                    parameter.data = parameter.data.contiguous()
    if args.unfused:  # the folded networks, each convolution's activation a separate call
        for network in predictor.networks():
            network.fused = False
        for reader in predictor.package.readers():
            for layer in reader.inference_net().modules():
                if hasattr(layer, "fused"):
                    layer.fused = False
    if args.grid:  # what a model trained on that grid would cost: same networks, more pixels
        size, spacing = args.grid.split(",")
        predictor.package.preprocess.image_size = int(size)
        predictor.package.preprocess.spacing_mm = float(spacing)
    predictor.predict(series, heatmaps=True, basis=True, batch_size=args.batch)  # warm-up
    runs = []
    for _ in range(args.repeat):
        started = time.perf_counter()
        prediction = predictor.predict(series, heatmaps=True, basis=True, batch_size=args.batch)
        runs.append((time.perf_counter() - started, prediction.timings))
        flagged = [k for k, v in prediction.flags.items() if v]
        del prediction  # a worker drops each study's prediction before the next: so does this
    total = statistics.median(r[0] for r in runs)
    stages = {k: statistics.median(r[1][k] for r in runs) for k in runs[0][1] if k != "total"}
    result = {
        "slices": len(series.sop_instance_uids),
        "device": args.device,
        "grid": f"{predictor.package.preprocess.image_size} px",
        "channels_last": not args.nchw,
        "fused": not args.unfused,
        "threads": torch.get_num_threads(),
        "read_dicom_s": round(read_s, 3),
        "predict_s_median": round(total, 3),
        "stages_s": {k: round(v, 3) for k, v in stages.items()},
        "flagged": flagged,
        # ru_maxrss is in KiB on Linux: this is MiB (2**20 bytes)
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if args.device == "cuda":
        result["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        result["gpu"] = torch.cuda.get_device_name()
    print("RESULT " + json.dumps(result))


def _resliced(study, slices, np):  # type: ignore[no-untyped-def]
    """A long thin-slice study from a phantom: the same head resampled to many slices along z."""
    from dataclasses import replace

    z = np.linspace(study.positions_mm[0], study.positions_mm[-1], slices)
    below = np.clip(np.searchsorted(study.positions_mm, z) - 1, 0, len(study.positions_mm) - 2)
    w = (z - study.positions_mm[below]) / np.diff(study.positions_mm)[below]
    hu = study.hu[below] * (1 - w[:, None, None]) + study.hu[below + 1] * w[:, None, None]
    step = float(z[1] - z[0])
    return replace(
        study,
        hu=hu.astype(np.int16),
        positions_mm=z,
        slice_thickness_mm=step,
        masks=np.zeros(hu.shape, np.uint8),
        slice_labels=np.zeros((slices, 6), np.uint8),
    )


def machine_line() -> str:
    """What the figures depend on: the CPU model and its vector extensions, the cores, torch,
    and the load when the run began (docs/benchmarks.md sorts figures by these)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    extensions = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    import torch

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"machine: {model} ({' '.join(extensions) or 'no AVX2'}), {os.cpu_count()} CPUs, "
        f"python {platform.python_version()}, torch {torch.__version__}, load {load}"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--slices", type=int, nargs="*", default=[40, 500])
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=None, help="default: the predictor's")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--nchw", action="store_true", help="turn channels-last memory off")
    parser.add_argument("--unfused", action="store_true", help="turn fused convolutions off")
    parser.add_argument("--grid", help="SIZE,MM: run the model's networks on another grid")
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--write", help=argparse.SUPPRESS)
    parser.add_argument("--series", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write:
        write(args)
        return
    if args.child:
        child(args)
        return
    print(machine_line())
    for slices in args.slices:
        size = ["--slices", str(slices), "--seed", str(args.seed)]
        command = [sys.executable, __file__, "--child", "--device", args.device]
        command += ["--repeat", str(args.repeat)]
        if args.model:
            command += ["--model", args.model]
        if args.batch:
            command += ["--batch", str(args.batch)]
        if args.nchw:
            command.append("--nchw")
        if args.unfused:
            command.append("--unfused")
        if args.grid:
            command += ["--grid", args.grid]
        with tempfile.TemporaryDirectory() as folder:
            subprocess.run([sys.executable, __file__, "--write", folder, *size], check=True)  # noqa: S603
            run = subprocess.run(  # noqa: S603
                [*command, *size, "--series", folder], capture_output=True, text=True
            )
        if run.returncode != 0:  # a one-shot GPU run must leave its reason behind
            print(run.stdout, end="")
            print(run.stderr, end="", file=sys.stderr)
            raise SystemExit(f"the {slices}-slice run failed (exit {run.returncode})")
        output = run.stdout
        line = next(x for x in output.splitlines() if x.startswith("RESULT "))
        result = json.loads(line[len("RESULT ") :])
        stages = ", ".join(f"{k} {v:.2f}s" for k, v in result["stages_s"].items())
        print(
            f"{result['slices']:>4} slices on {result['device']} ({result['grid']}, "
            f"{'channels-last' if result['channels_last'] else 'NCHW'}"
            f"{'' if result['fused'] else ', unfused'}): "
            f"predict {result['predict_s_median']:.2f}s "
            f"median of {args.repeat} ({stages}); DICOM read {result['read_dicom_s']:.2f}s; "
            f"peak RSS {result['peak_rss_mib']:.0f} MiB"
        )
        print(json.dumps(result))


if __name__ == "__main__":
    main()
