"""Runs the whole test suite as two pytest processes at once, so that `make test` uses both
cores of a 2-core machine: the tiny training run trains on one thread by design (the same
numbers on every run of a machine kind, tests/inference/test_training.py), and while it does,
the other core runs everything else.

    .venv/bin/python scripts/test_lanes.py [--first COMMAND]... [PYTEST ARGS...]

Lane "training" runs SLOW_MODULES; its output goes to var/logs/test-training.log and is printed
after the other lane's. It starts at once. Lane "main" first runs each --first command in turn
(`make test` passes lint and the test tools' install this way, so that they use the core the
training lane leaves; a failing one fails the run and stops the training lane), then the rest
of the tests with their output live. Both lanes run one thread per process (OMP_NUM_THREADS=1,
the Celery workers and phantom writers they start included): with the other lane busy on the
other core, a second compute thread would only wait for a core, or spin on one the other lane
needs (the phantom writers' matrix products took a fifth longer so). The exit status is
the first non-zero one of the two. With fewer than two cores, or ICH_TEST_LANES=1, it runs the
--first commands and then one pytest over everything. Extra arguments go to both lanes (for
example -x or --durations=20); to run a few tests, call pytest directly.
"""

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The tiny training module, and after it modules that balance the two lanes (on the 2-core AMD
# VM, with the tiny run at 8 epochs, the main lane's lint and the rest of its tests took 14.5
# min against 13 for the first two; the phantom module took 45 s of the 14.5).
SLOW_MODULES = [
    "tests/inference/test_training.py",
    "tests/inference/test_shipped_model.py",
    "tests/inference/test_phantom.py",
]


def split_arguments(argv: list[str]) -> tuple[list[list[str]], list[str]]:
    """The --first commands (each split as a shell would) and the pytest arguments."""
    first: list[list[str]] = []
    rest: list[str] = []
    items = iter(argv)
    for item in items:
        if item == "--first":
            command = next(items, None)
            if not command:
                raise SystemExit("test_lanes.py: --first needs a command")
            first.append(shlex.split(command))
        elif item.startswith("--first="):
            first.append(shlex.split(item.removeprefix("--first=")))
        else:
            rest.append(item)
    return first, rest


def run_first(commands: list[list[str]]) -> int:
    for command in commands:
        print(f"[lanes] {shlex.join(command)}", flush=True)
        status = subprocess.call(command, cwd=ROOT)  # noqa: S603 - the Makefile's own commands
        if status:
            print(f"[lanes] failed ({status}): {shlex.join(command)}", flush=True)
            return status
    return 0


def stop(lane: subprocess.Popen[bytes]) -> None:
    """Interrupts the lane's whole process group (pytest and the phantom writers it may have
    started clean up and exit), then kills what is left of it after a minute."""
    for signum, wait in ((signal.SIGINT, 60), (signal.SIGKILL, None)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(lane.pid, signum)
        with contextlib.suppress(subprocess.TimeoutExpired):
            lane.wait(timeout=wait)
            return


def interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main() -> int:
    # The training lane has a session of its own: a TERM or HUP that ends this process (a CI
    # timeout, a closed terminal) stops it as Ctrl-C does. Ctrl-C itself is handled here even
    # where this process was started with SIGINT ignored (in the background of a shell without
    # job control), so that the lanes, which would inherit the ignoring, answer it too.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGHUP, interrupted)
    first, extra = split_arguments(sys.argv[1:])
    pytest = [sys.executable, "-m", "pytest"]
    if (os.cpu_count() or 1) < 2 or os.environ.get("ICH_TEST_LANES") == "1":
        return run_first(first) or subprocess.call([*pytest, *extra], cwd=ROOT)  # noqa: S603
    log = Path(os.environ.get("ICH_VAR_DIR", ROOT / "var")) / "logs" / "test-training.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    ignored = [f"--ignore={module}" for module in SLOW_MODULES]
    started = time.monotonic()
    one_thread = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(log, "w") as out:
        # no cache plugin in this lane: the main lane's last-failed record stays its own
        training = subprocess.Popen(  # noqa: S603 - pytest itself
            [*pytest, "-p", "no:cacheprovider", *SLOW_MODULES, *extra],
            cwd=ROOT,
            env=one_thread,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, which stop() can end as one
        )
        training_ended: list[float] = []  # when the training lane ended, as seen by a thread

        def watch() -> None:
            training.wait()
            training_ended.append(time.monotonic())

        threading.Thread(target=watch, daemon=True).start()
        print(f"[lanes] training lane: {' '.join(SLOW_MODULES)} (output: {log})", flush=True)
        try:
            main_status = run_first(first)
            first_done = time.monotonic()
            if main_status:
                stop(training)
                return main_status
            main_status = subprocess.call(  # noqa: S603 - pytest itself
                [*pytest, *ignored, *extra], cwd=ROOT, env=one_thread
            )
            main_done = time.monotonic()
            if training.poll() is None:
                print("[lanes] main lane done; waiting for the training lane", flush=True)
            training_status = training.wait()
            training_done = training_ended[0] if training_ended else time.monotonic()
        except KeyboardInterrupt:
            stop(training)
            raise
    print(f"\n[lanes] ===== training lane ({log}) =====", flush=True)
    sys.stdout.write(log.read_text())
    minutes = (time.monotonic() - started) / 60
    print(
        f"[lanes] main lane exit {main_status}, training lane exit {training_status}, "
        f"{minutes:.1f} min in all (main lane: --first commands "
        f"{(first_done - started) / 60:.1f} min, then its tests {(main_done - first_done) / 60:.1f}"
        f" min; training lane {(training_done - started) / 60:.1f} min)",
        flush=True,
    )
    return main_status or training_status


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt as stopped:
        print(f"[lanes] interrupted ({stopped or 'SIGINT'}); both lanes stopped", flush=True)
        sys.exit(130)
