"""Sends every DICOM file under a folder by C-STORE (pynetdicom as the sender) with a summary.

The files go as they are, in their own transfer syntaxes (each SOP class and transfer syntax
pair is proposed as it is found; nothing is decoded or re-encoded). Files that are not DICOM are
skipped and counted. An instance the receiver refuses is listed with its status and the
receiver's comment; the command fails only when nothing could be sent.
"""

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config
from pynetdicom.presentation import build_context

from worklist.receiver import MAXIMUM_PDU_SIZE, TCP_NODELAY_HANDLERS

MAX_CONTEXTS = 128  # the most presentation contexts one association may propose
SUCCESS_OR_WARNING = (0x0000, 0xB000, 0xB006, 0xB007)


@dataclass(frozen=True)
class DicomFile:
    path: Path
    sop_class_uid: str
    transfer_syntax_uid: str


@dataclass
class SendSummary:
    accepted: int = 0
    refused: list[tuple[Path, int | None, str]] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def sent(self) -> int:
        return self.accepted + len(self.refused)


def dicom_files(folder: Path) -> tuple[list[DicomFile], list[Path]]:
    """The DICOM Part-10 files under ``folder`` (recursively, hidden files left out), and the
    files that are not."""
    found, skipped = [], []
    candidates = [folder] if folder.is_file() else sorted(folder.rglob("*"))
    for path in candidates:
        hidden = any(part.startswith(".") for part in path.relative_to(folder).parts)
        if not path.is_file() or hidden:
            continue
        try:
            meta = read_file_meta_info(path)
            found.append(
                DicomFile(path, str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))
            )
        except (InvalidDicomError, AttributeError, OSError, ValueError, EOFError):
            skipped.append(path)
    return found, skipped


def _batches(files: list[DicomFile]) -> Iterator[list[DicomFile]]:
    """Groups of files whose (SOP class, transfer syntax) pairs fit in one association."""
    pairs = sorted({(f.sop_class_uid, f.transfer_syntax_uid) for f in files})
    for start in range(0, len(pairs), MAX_CONTEXTS):
        chosen = set(pairs[start : start + MAX_CONTEXTS])
        yield [f for f in files if (f.sop_class_uid, f.transfer_syntax_uid) in chosen]


@dataclass(frozen=True)
class Receiver:
    host: str
    port: int
    called_ae: str
    calling_ae: str = "ICH_SEND"
    delay: float = 0.0  # seconds between instances
    tcp_nodelay: bool = True  # off only to measure what it buys (bench/ingest.py)


def send_files(files: list[DicomFile], receiver: Receiver) -> SendSummary:
    """C-STORE each file, one association per batch of presentation contexts."""
    chunked = pynetdicom_config.STORE_SEND_CHUNKED_DATASET
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True  # stream the file's own bytes
    summary = SendSummary()
    started = time.perf_counter()
    try:
        for batch in _batches(files):
            _send_batch(batch, receiver, summary)
    finally:
        pynetdicom_config.STORE_SEND_CHUNKED_DATASET = chunked
    summary.seconds = time.perf_counter() - started
    return summary


def _send_batch(batch: list[DicomFile], receiver: Receiver, summary: SendSummary) -> None:
    ae = AE(ae_title=receiver.calling_ae)
    ae.maximum_pdu_size = MAXIMUM_PDU_SIZE
    pairs = sorted({(f.sop_class_uid, f.transfer_syntax_uid) for f in batch})
    contexts = [build_context(sop_class, [syntax]) for sop_class, syntax in pairs]
    handlers: list[Any] = list(TCP_NODELAY_HANDLERS) if receiver.tcp_nodelay else []
    assoc = ae.associate(
        receiver.host,
        receiver.port,
        contexts,
        ae_title=receiver.called_ae,
        evt_handlers=handlers,
    )
    if not assoc.is_established:
        where = f"{receiver.called_ae} at {receiver.host}:{receiver.port}"
        raise CommandError(f"No association with {where} (rejected or not listening).")
    try:
        for index, dicom_file in enumerate(batch):
            if index and receiver.delay:
                time.sleep(receiver.delay)
            _send_one(assoc, dicom_file, summary)
    finally:
        if assoc.is_established:
            assoc.release()


def _send_one(assoc: Any, dicom_file: DicomFile, summary: SendSummary) -> None:
    try:
        status = assoc.send_c_store(dicom_file.path)
    except (ValueError, AttributeError) as error:  # no accepted context, unreadable file
        summary.refused.append((dicom_file.path, None, str(error)))
        return
    code = int(status.Status) if "Status" in status else None
    if code in SUCCESS_OR_WARNING:
        summary.accepted += 1
    else:
        comment = str(status.get("ErrorComment", "")) if code is not None else "no response"
        summary.refused.append((dicom_file.path, code, comment))


class Command(BaseCommand):
    help = "Send every DICOM file under PATH (recursively) by C-STORE and print a summary."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("path", type=Path)
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=settings.ICH_DICOM_PORT)
        parser.add_argument(
            "--ae-title", default=settings.ICH_DICOM_AE_TITLE, help="the receiver's (called) AE"
        )
        parser.add_argument("--calling-ae", default="ICH_SEND", help="this sender's AE title")
        parser.add_argument(
            "--delay", type=float, default=0.0, help="seconds to wait between instances"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        folder: Path = options["path"]
        if not folder.exists():
            raise CommandError(f"{folder} does not exist.")
        files, skipped = dicom_files(folder)
        if not files:
            raise CommandError(f"No DICOM files under {folder} ({len(skipped)} other files).")
        receiver = Receiver(
            host=options["host"],
            port=options["port"],
            called_ae=options["ae_title"],
            calling_ae=options["calling_ae"],
            delay=options["delay"],
        )
        summary = send_files(files, receiver)
        summary.skipped = skipped
        self._report(summary, options)
        if not summary.accepted:
            raise CommandError("The receiver accepted none of the files.")

    def _report(self, summary: SendSummary, options: dict[str, Any]) -> None:
        rate = summary.sent / summary.seconds if summary.seconds else 0.0
        self.stdout.write(
            f"Sent {summary.sent} files to {options['ae_title']} at {options['host']}:"
            f"{options['port']} in {summary.seconds:.1f} s ({rate:.1f} instances/s): "
            f"{summary.accepted} accepted, {len(summary.refused)} refused, "
            f"{len(summary.skipped)} skipped (not DICOM)."
        )
        for path, code, comment in summary.refused:
            status = f"0x{code:04X}" if code is not None else "not sent"
            self.stderr.write(f"  refused {path}: {status} {comment}")
