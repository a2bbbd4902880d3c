"""Ingest throughput: instances per second over C-STORE and over STOW-RS.

    .venv/bin/python bench/ingest.py                # 200 phantom CT slices (512 x 512) per run
    .venv/bin/python bench/ingest.py --instances 500

Runs against the project's Postgres and Redis (started by `make run` / scripts/services.sh) but
in a database of its own (created and dropped here), a temporary media root and Redis database
14 (emptied at the end), so a running app is never touched.

- C-STORE: the real receiver (worklist.receiver) in this process on a free port, and
  `send_study`'s sender (pynetdicom, the files' own bytes, one association) sending N files;
  then the same N again: the resend (duplicate) rate.
- C-STORE transport only: the receiver answers success without ingest, with TCP_NODELAY on both
  ends (as shipped) and with Nagle's algorithm left on, for full slices and for small (64 x 64,
  8 kB) instances, where a small write waiting for a delayed ACK shows.
- STOW-RS: one POST /dicomweb/studies with N parts through Django's test client (no network,
  no ASGI server): the multipart reader and the same ingest service.

Every instance is validated, written (fsync'd), hashed, indexed and audited as in production.
Prints one line per run and a JSON line with all figures.
"""

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BENCH_DATABASE = f"bench_ingest_{os.getpid()}"


def _environment(media_root: Path) -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "ichweb.settings")
    os.environ["ICH_MEDIA_ROOT"] = str(media_root)
    port = os.environ.get("ICH_REDIS_PORT", "6390")
    os.environ["REDIS_URL"] = os.environ.get("BENCH_REDIS_URL", f"redis://127.0.0.1:{port}/14")


def _series(count: int, tag: str, *, size: int = 512) -> list[bytes]:
    """``count`` distinct CT instances: phantom slices with fresh UIDs, one study per call.

    ``size`` below 512 crops the slices (small instances show per-message latency)."""
    import pydicom
    from pydicom.uid import generate_uid

    from inference.phantom import generate_study, write_study

    with tempfile.TemporaryDirectory() as directory:
        paths = write_study(generate_study(11, n_slices=40, subtypes=[]), Path(directory))
        templates = [pydicom.dcmread(path) for path in paths]
    study_uid, series_uid = generate_uid(), generate_uid()
    instances = []
    for index in range(count):
        dataset = templates[index % len(templates)]
        if size != dataset.Rows:
            dataset.PixelData = dataset.pixel_array[:size, :size].copy().tobytes()
            dataset.Rows = dataset.Columns = size
        dataset.StudyInstanceUID, dataset.SeriesInstanceUID = study_uid, series_uid
        dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        dataset.InstanceNumber = index + 1
        dataset.AccessionNumber = tag
        buffer = io.BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        instances.append(buffer.getvalue())
    return instances


def _answer_without_ingest(event: Any) -> int:
    event.encoded_dataset()  # what the real handler reads, so only ingest is left out
    return 0x0000


def _c_store(
    instances: list[bytes], folder: Path, *, nodelay: bool = True, ingest: bool = True
) -> float:
    """Seconds to send ``instances`` over one association to a receiver in this process."""
    from pynetdicom import evt

    from worklist import receiver
    from worklist.management.commands import send_study

    folder.mkdir(parents=True, exist_ok=True)
    for index, data in enumerate(instances):
        (folder / f"IM{index:05d}.dcm").write_bytes(data)
    files, _ = send_study.dicom_files(folder)
    handlers = receiver.receiver_handlers()
    if not nodelay:
        handlers = [h for h in handlers if h not in receiver.TCP_NODELAY_HANDLERS]
    if not ingest:
        handlers = [h for h in handlers if h[0] is not evt.EVT_C_STORE]
        handlers.append((evt.EVT_C_STORE, _answer_without_ingest))
    ae = receiver.build_receiver(ae_title="BENCH")
    server = cast(Any, ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers))
    target = send_study.Receiver(
        host="127.0.0.1", port=server.server_address[1], called_ae="BENCH", tcp_nodelay=nodelay
    )
    try:
        summary = send_study.send_files(files, target)
    finally:
        server.shutdown()
    if summary.accepted != len(instances):
        raise SystemExit(f"C-STORE: only {summary.accepted} of {len(instances)} accepted")
    return summary.seconds


def _stow(instances: list[bytes]) -> float:
    from django.contrib.auth.models import Group, User
    from django.test import Client

    user = User.objects.create_user("bench-radiologist")
    user.groups.add(Group.objects.get_or_create(name="radiologist")[0])
    client = Client()
    client.force_login(user)
    boundary = "bench-boundary-7d1c"
    body = (
        b"".join(
            f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data + b"\r\n"
            for data in instances
        )
        + f"--{boundary}--\r\n".encode()
    )
    content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
    started = time.perf_counter()
    response = client.post("/dicomweb/studies", data=body, content_type=content_type)
    seconds = time.perf_counter() - started
    if response.status_code != 200:
        raise SystemExit(f"STOW-RS answered {response.status_code}: {response.content[:300]!r}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--instances", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        _environment(Path(scratch) / "media")
        import django

        django.setup()
        from django.db import connection
        from pynetdicom import _config as pynetdicom_config

        pynetdicom_config.LOG_HANDLER_LEVEL = "none"
        original_database = connection.settings_dict["NAME"]
        connection.settings_dict["TEST"]["NAME"] = BENCH_DATABASE
        connection.creation.create_test_db(verbosity=0, autoclobber=True)
        try:
            figures = _run(args.instances, Path(scratch))
        finally:
            connection.creation.destroy_test_db(original_database, verbosity=0)
            _empty_redis(os.environ["REDIS_URL"])
    print(json.dumps(figures))


def _run(count: int, scratch: Path) -> dict[str, object]:
    print(f"{count} phantom CT instances per run; {os.cpu_count()} CPUs ({platform.node()})")
    runs: dict[str, float] = {}

    def report(key: str, label: str, seconds: float) -> None:
        runs[key] = count / seconds
        print(f"{label:<58} {runs[key]:7.1f} instances/s")

    full = _series(count, "c-store")
    report("c_store", "C-STORE, 512 x 512, ingest (as shipped)", _c_store(full, scratch / "a"))
    report(
        "c_store_resend", "C-STORE resend of the same (duplicates)", _c_store(full, scratch / "b")
    )
    report(
        "stow_rs", f"STOW-RS, 512 x 512, one request of {count} parts", _stow(_series(count, "s"))
    )
    # The network path alone (the receiver answers without ingest): what TCP_NODELAY buys.
    for size in (512, 64):
        instances = _series(count, f"t{size}", size=size)
        for nodelay in (True, False):
            seconds = _c_store(
                instances, scratch / f"t{size}{nodelay}", nodelay=nodelay, ingest=False
            )
            label = f"C-STORE transport only, {size} x {size}, " + (
                "TCP_NODELAY" if nodelay else "Nagle on"
            )
            report(f"transport_{size}_{'nodelay' if nodelay else 'nagle'}", label, seconds)
    return {
        "bench": "ingest",
        "instances": count,
        "cpus": os.cpu_count(),
        "instances_per_second": {key: round(value, 1) for key, value in runs.items()},
    }


def _empty_redis(url: str) -> None:
    import redis

    redis.Redis.from_url(url).flushdb()


if __name__ == "__main__":
    main()
