"""scripts/test_lanes.py, the two pytest processes of `make test`: its arguments, the commands
the main lane runs first, and how a lane is stopped."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from test_lanes import run_first, split_arguments, stop


def test_first_commands_are_split_from_the_pytest_arguments() -> None:
    first, rest = split_arguments(
        ["--first", "make lint", "-x", "--first=echo 'a b'", "--durations=5"]
    )
    assert first == [["make", "lint"], ["echo", "a b"]]
    assert rest == ["-x", "--durations=5"]
    with pytest.raises(SystemExit):
        split_arguments(["-x", "--first"])


def test_the_first_failing_command_ends_the_first_commands(tmp_path: Path) -> None:
    never = tmp_path / "never"
    status = run_first([["true"], ["sh", "-c", "exit 3"], ["touch", str(never)]])
    assert status == 3 and not never.exists()
    assert run_first([["true"], ["true"]]) == 0


CHILD = """
import signal, subprocess, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # as test_lanes.py sets it
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
print("ready", flush=True)
time.sleep(300)
"""


def test_stopping_a_lane_ends_its_whole_process_group() -> None:
    lane = subprocess.Popen(
        [sys.executable, "-c", CHILD], stdout=subprocess.PIPE, start_new_session=True
    )
    assert lane.stdout is not None and lane.stdout.readline() == b"ready\n"
    stop(lane)
    assert lane.returncode is not None
    with pytest.raises(ProcessLookupError):  # the grandchild went with it
        for _ in range(100):
            os.killpg(lane.pid, 0)
            time.sleep(0.05)
