"""Runs the whole test suite as two pytest processes at once, so that `make test` uses both
cores of a 2-core machine: the tiny training run trains on one thread by design (the same
numbers on every run of a machine kind, tests/inference/test_training.py), and while it does,
the other core runs everything else.

    .venv/bin/python scripts/test_lanes.py [PYTEST ARGS...]

Lane "training" runs SLOW_MODULES; its output goes to var/logs/test-training.log and is printed
after the other lane's. Lane "main" runs the rest with its output live, on one thread per process
(OMP_NUM_THREADS=1, the Celery workers it starts included): with the training lane busy on the
other core, a second compute thread would only wait for a core, or spin on one the training lane
needs. The exit status is the
first non-zero one of the two. With fewer than two cores, or ICH_TEST_LANES=1, it runs one
pytest over everything. Extra arguments go to both lanes (for example -x or --durations=20);
to run a few tests, call pytest directly.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SLOW_MODULES = ["tests/inference/test_training.py"]


def main() -> int:
    extra = sys.argv[1:]
    pytest = [sys.executable, "-m", "pytest"]
    if (os.cpu_count() or 1) < 2 or os.environ.get("ICH_TEST_LANES") == "1":
        return subprocess.call([*pytest, *extra], cwd=ROOT)  # noqa: S603 - pytest itself
    log = Path(os.environ.get("ICH_VAR_DIR", ROOT / "var")) / "logs" / "test-training.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    ignored = [f"--ignore={module}" for module in SLOW_MODULES]
    started = time.monotonic()
    with open(log, "w") as out:
        # no cache plugin in this lane: the main lane's last-failed record stays its own
        training = subprocess.Popen(  # noqa: S603 - pytest itself
            [*pytest, "-p", "no:cacheprovider", *SLOW_MODULES, *extra],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        print(f"[lanes] training lane: {' '.join(SLOW_MODULES)} (output: {log})", flush=True)
        try:
            one_thread = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
            main_status = subprocess.call(  # noqa: S603 - pytest itself
                [*pytest, *ignored, *extra], cwd=ROOT, env=one_thread
            )
            if training.poll() is None:
                print("[lanes] main lane done; waiting for the training lane", flush=True)
            training_status = training.wait()
        except KeyboardInterrupt:
            training.send_signal(signal.SIGINT)
            training.wait()
            raise
    print(f"\n[lanes] ===== training lane ({log}) =====", flush=True)
    sys.stdout.write(log.read_text())
    minutes = (time.monotonic() - started) / 60
    print(
        f"[lanes] main lane exit {main_status}, training lane exit {training_status}, "
        f"{minutes:.1f} min in all",
        flush=True,
    )
    return main_status or training_status


if __name__ == "__main__":
    sys.exit(main())
