"""The demo on an empty database: phantom studies (and the CQ500 studies in ../shared/data when
present) sent through the real C-STORE receiver a few seconds apart, so a new user sees studies
arrive and get scored live. Started by `make run` (Procfile.dev); does nothing when studies exist.
"""

import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand

from worklist.models import Study

# (seed, subtypes): a mix a demo should show, negatives with mimics included.
DEMO_PHANTOMS: tuple[tuple[int, list[str]], ...] = (
    (101, ["subdural"]),
    (102, []),
    (103, ["epidural"]),
    (104, ["intraparenchymal", "intraventricular"]),
    (105, []),
    (106, ["subarachnoid"]),
)


class Command(BaseCommand):
    help = "Send demo studies through the C-STORE receiver when the database has no study."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--delay", type=float, default=4.0, help="seconds between studies")
        parser.add_argument(
            "--stay",
            action="store_true",
            help="keep running afterwards (under a supervisor that stops all "
            "processes when one exits)",
        )

    def handle(self, *args: Any, delay: float = 4.0, stay: bool = False, **options: Any) -> None:
        if Study.objects.exists():
            self.stdout.write("demo: studies exist, nothing sent")
        else:
            self._wait_for_receiver()
            for folder in self._folders():
                call_command("send_study", str(folder), "--calling-ae", "ICH_DEMO")
                time.sleep(delay)
            self.stdout.write(self.style.SUCCESS("demo: all studies sent"))
        if stay:
            signal.pause()

    def _folders(self) -> list[Path]:
        from inference.phantom import generate_study, write_study

        root = Path(settings.VAR_DIR) / "demo"
        folders = []
        for seed, subtypes in DEMO_PHANTOMS:
            folder = root / f"phantom-{seed}"
            if not folder.exists():
                write_study(
                    generate_study(seed, subtypes=subtypes),
                    folder,
                    patient_name=f"DEMO^PHANTOM{seed}",
                    patient_id=f"DEMO{seed}",
                )
            folders.append(folder)
        real = Path(
            os.environ.get("ICH_REAL_DATA_DIR", settings.BASE_DIR.parent / "shared" / "data")
        )
        cq500 = real / "cq500"
        if cq500.is_dir():
            folders += sorted(p for p in cq500.iterdir() if p.is_dir())
        return folders

    def _wait_for_receiver(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                probe.settimeout(1)
                if probe.connect_ex((settings.ICH_DICOM_HOST, settings.ICH_DICOM_PORT)) == 0:
                    return
            time.sleep(0.5)
        raise TimeoutError("the DICOM receiver did not start")
