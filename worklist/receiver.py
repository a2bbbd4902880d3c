"""The DICOM receiver: scanners and archives send images by C-STORE, and check it by C-ECHO.

Every received instance goes through ``ingest.instance_ingest``, the same door as STOW-RS and
uploads. The answer is the ingest outcome as a DICOM status: success for a stored instance and
for a resend of a known one; a failure status with an ErrorComment naming the reason for a
refused one (which is then in quarantine). The raw bytes as received are stored: nothing is
decoded and re-encoded on the way in.

Logs name AE titles, addresses and counts, never patient data.
"""

import contextlib
import logging
import queue
import socket
import threading
from collections import Counter
from pathlib import Path
from typing import Any, cast

from django.conf import settings
from django.db import connections
from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLossless,
    JPEGLosslessSV1,
    LegacyConvertedEnhancedCTImageStorage,
    MRImageStorage,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    MultiFrameTrueColorSecondaryCaptureImageStorage,
    NuclearMedicineImageStorage,
    PositronEmissionTomographyImageStorage,
    SecondaryCaptureImageStorage,
    UltrasoundImageStorage,
    UltrasoundMultiFrameImageStorage,
    XRayAngiographicImageStorage,
)
from pynetdicom import AE, _config, evt
from pynetdicom.events import Event
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from worklist.ingest import (
    OUT_OF_RESOURCES,
    PROCESSING_FAILURE,
    IngestOutcome,
    instance_ingest,
)
from worklist.models import IngestSource

logger = logging.getLogger(__name__)

SUCCESS = 0x0000
VERIFICATION = "1.2.840.10008.1.1"
# The image storage SOP classes a head-CT triage site is sent: CT first, and whatever else a
# scanner or archive routes along (stored, listed, never scored).
RECEIVED_SOP_CLASSES = (
    CTImageStorage,
    EnhancedCTImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
    MRImageStorage,
    EnhancedMRImageStorage,
    SecondaryCaptureImageStorage,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    MultiFrameTrueColorSecondaryCaptureImageStorage,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    XRayAngiographicImageStorage,
    PositronEmissionTomographyImageStorage,
    NuclearMedicineImageStorage,
    UltrasoundImageStorage,
    UltrasoundMultiFrameImageStorage,
)
# What the series reader decodes: uncompressed, JPEG Lossless (process 14, and its SV1 form),
# JPEG 2000 (lossless and lossy).
TRANSFER_SYNTAXES = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLosslessSV1,
    JPEGLossless,
    JPEG2000Lossless,
    JPEG2000,
)
# Larger PDUs than pynetdicom's 16 kB mean fewer reads per 512 x 512 slice; peers may send less.
MAXIMUM_PDU_SIZE = 1024 * 1024
# The longest PDU read: what we advertise, with room for a peer that counts its headers in. A
# peer declaring more is cut off before the bytes are read (pynetdicom would read up to 4 GiB
# into memory for one PDU, whatever maximum it advertised).
LONGEST_PDU_READ = 2 * MAXIMUM_PDU_SIZE
ERROR_COMMENT_LENGTH = 64  # ErrorComment is LO


def set_tcp_nodelay(event: Event) -> None:
    """Send each PDU at once: with Nagle's algorithm a small command PDU followed by the data
    set waits for the peer's delayed ACK (about 40 ms per instance on Linux)."""
    wrapper = event.assoc.dul.socket
    if wrapper is not None and wrapper.socket is not None:
        wrapper.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


TCP_NODELAY_HANDLERS = [(evt.EVT_CONN_OPEN, set_tcp_nodelay)]


def build_receiver(*, ae_title: str, allowed_calling_aets: list[str] | None = None) -> AE:
    """The acceptor AE: verification and image storage in the transfer syntaxes we decode.

    ``allowed_calling_aets``: when not empty, associations from other AE titles are rejected.
    """
    # Each instance is spooled to a temporary file as its fragments arrive, not held in memory:
    # a large or never-finished data set grows on disk, and many senders at once cost no RAM.
    _config.STORE_RECV_CHUNKED_DATASET = True
    ae = AE(ae_title=ae_title)
    ae.maximum_pdu_size = MAXIMUM_PDU_SIZE
    ae.maximum_associations = settings.ICH_DICOM_MAX_ASSOCIATIONS
    ae.acse_timeout = settings.ICH_DICOM_ASSOCIATION_TIMEOUT_SECONDS
    ae.require_calling_aet = list(allowed_calling_aets or [])
    ae.add_supported_context(VERIFICATION)
    for sop_class in RECEIVED_SOP_CLASSES:
        ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
    return ae


def receiver_handlers() -> list[Any]:
    return [
        *TCP_NODELAY_HANDLERS,
        (evt.EVT_C_STORE, handle_store),
        (evt.EVT_ACCEPTED, _log_accepted),
        (evt.EVT_REJECTED, _log_rejected),
        (evt.EVT_PDU_RECV, _limit_instance_size),
        (evt.EVT_RELEASED, _association_ended),
        (evt.EVT_ABORTED, _association_ended),
    ]


class _BoundedSocket(AssociationSocket):
    """pynetdicom's socket, refusing to read a PDU longer than LONGEST_PDU_READ: the connection
    is then treated as closed (the reader sees a short PDU) and the association ends."""

    def recv(self, nr_bytes: int) -> bytearray:
        if nr_bytes > LONGEST_PDU_READ:
            logger.warning(
                "Connection from %s cut off: it declared a PDU of %d bytes, over the %d read",
                self.assoc.requestor.address,
                nr_bytes,
                LONGEST_PDU_READ,
            )
            return bytearray()
        return super().recv(nr_bytes)


class _ConnectionHandler(RequestHandler):
    """pynetdicom's handler, kept until its association ends, so the server knows which of a
    peer's connections are still open. Its socket times out when a peer stalls (pynetdicom
    sets no timeout on an accepted socket, so a half-sent PDU held its thread forever), and
    when the association ends, whatever it left is cleaned up: spool files of instances not
    handled, and the socket itself."""

    def handle(self) -> None:
        self.request.settimeout(self.ae.network_timeout)
        self.request.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        assoc = self._create_association()
        assoc.dul.socket.__class__ = _BoundedSocket  # made by _create_association; same state
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        assoc.start()
        try:
            assoc.join()
        finally:
            _discard_spools(assoc)
            with _tallies_lock:  # a C-STORE answered after the association-ended log
                _tallies.pop(id(assoc), None)
            with contextlib.suppress(OSError):
                self.request.shutdown(socket.SHUT_RDWR)
            self.request.close()


class ReceiverServer(ThreadedAssociationServer):
    """The association server, with at most ``per_address`` connections open from one address
    at a time: one misbehaving host cannot take every association the receiver allows
    (ICH_DICOM_MAX_ASSOCIATIONS) from the scanners. A connection over the limit is closed before
    it is read, and logged with its address."""

    daemon_threads = True

    def __init__(self, *args: Any, per_address: int, **kwargs: Any) -> None:
        self.per_address = per_address
        self._open: Counter[str] = Counter()
        self._open_lock = threading.Lock()
        kwargs["request_handler"] = _ConnectionHandler
        super().__init__(*args, **kwargs)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        host = str(client_address[0])
        with self._open_lock:
            if self._open[host] >= self.per_address:
                logger.warning(
                    "Connection from %s refused: %d connections from that address are open"
                    " (ICH_DICOM_MAX_ASSOCIATIONS_PER_ADDRESS)",
                    host,
                    self._open[host],
                )
                return False
            self._open[host] += 1
        return True

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            host = str(client_address[0])
            with self._open_lock:
                self._open[host] -= 1
                if self._open[host] <= 0:
                    del self._open[host]

    def open_connections(self, host: str) -> int:
        with self._open_lock:
            return self._open[host]


def start_receiver(
    *,
    host: str,
    port: int,
    ae_title: str,
    allowed_calling_aets: list[str] | None = None,
    block: bool = True,
) -> ReceiverServer | None:
    """Listen for associations; ``block=False`` returns the running server (``.shutdown()``)."""
    ae = build_receiver(ae_title=ae_title, allowed_calling_aets=allowed_calling_aets)
    server = cast(
        ReceiverServer,
        ae.make_server(
            (host, port),
            evt_handlers=receiver_handlers(),
            server_class=ReceiverServer,
            per_address=settings.ICH_DICOM_MAX_ASSOCIATIONS_PER_ADDRESS,
        ),
    )
    ae._servers.append(server)
    if not block:
        thread = threading.Thread(target=server.serve_forever, name="DICOMReceiver", daemon=True)
        thread.start()
        return server
    try:
        server.serve_forever()
    finally:
        ae.shutdown()  # the server, and every open association aborted (their threads end)
    return None


# --- C-STORE --------------------------------------------------------------------------------


_tallies: dict[int, Counter[str]] = {}
_tallies_lock = threading.Lock()


def handle_store(event: Event) -> Dataset:
    requestor = event.assoc.requestor
    path = getattr(event, "dataset_path", None)
    if path is not None and Path(path).stat().st_size > _instance_limit():
        # its last fragments came before the abort the size check asked for
        return _status(OUT_OF_RESOURCES, "the instance is over ICH_DICOM_MAX_INSTANCE_MB")
    try:
        outcome = instance_ingest(
            data=_received_bytes(event),
            source=IngestSource.C_STORE,
            address=requestor.address,
            calling_ae=requestor.ae_title,
        )
    except OSError:
        logger.exception("C-STORE from %s: the file could not be written", requestor.ae_title)
        return _status(OUT_OF_RESOURCES, "the receiver could not store the file")
    except Exception:
        logger.exception("C-STORE from %s: ingest failed", requestor.ae_title)
        return _status(PROCESSING_FAILURE, "the receiver failed to process the instance")
    _tally(event, outcome)
    if outcome.accepted:
        return _status(SUCCESS)
    return _status(outcome.failure_code or PROCESSING_FAILURE, outcome.reason)


def _received_bytes(event: Event) -> bytes:
    """The instance as received, in the DICOM file format: from the file it was spooled to
    (``STORE_RECV_CHUNKED_DATASET``), or encoded from memory where it was not spooled."""
    path = getattr(event, "dataset_path", None)
    if path is not None:
        return Path(path).read_bytes()
    return bytes(event.encoded_dataset(include_meta=True))


def _unfinished_spool(assoc: Any) -> Any:
    """The temporary file an instance still arriving is spooled to, or None."""
    message = getattr(assoc.dimse, "message", None)
    return getattr(message, "_data_set_file", None)


def _instance_limit() -> int:
    return int(settings.ICH_DICOM_MAX_INSTANCE_MB) * 1024 * 1024


def _limit_instance_size(event: Event) -> None:
    """Aborts the association when the instance arriving would grow past
    ICH_DICOM_MAX_INSTANCE_MB with the PDU just read, before that PDU is written to disk.
    (The abort is sent after this PDU is handled: ``handle_store`` refuses an instance that
    was completed by it.)"""
    spool = _unfinished_spool(event.assoc)
    if spool is None or spool.closed or getattr(event.assoc, "_sent_abort", False):
        return
    items = getattr(event.pdu, "presentation_data_value_items", [])
    incoming = sum(len(item.presentation_data_value or b"") for item in items)
    if spool.tell() + incoming > _instance_limit():
        logger.warning(
            "C-STORE from %s aborted: the instance is over %d MB (ICH_DICOM_MAX_INSTANCE_MB)",
            _peer(event),
            settings.ICH_DICOM_MAX_INSTANCE_MB,
        )
        # the rest is refused by the abort; the spool goes when the association ends
        event.assoc.abort(block=False)


def _discard_spools(assoc: Any) -> None:
    """Once an association has ended: the spool of an instance it was receiving, and of any
    received instance it ended before handling (pynetdicom removes a spool only once it has
    answered the C-STORE)."""
    spool = _unfinished_spool(assoc)
    if spool is not None:
        _remove_spool(spool)
    while True:
        try:
            _, primitive = assoc.dimse.msg_queue.get_nowait()
        except queue.Empty:
            return
        spool = getattr(primitive, "_dataset_file", None)
        if spool is not None:
            _remove_spool(spool)


def _remove_spool(spool: Any) -> None:
    try:
        spool.close()
    finally:
        Path(spool.name).unlink(missing_ok=True)


def _status(code: int, comment: str = "") -> Dataset:
    status = Dataset()
    status.Status = code
    if comment:
        status.ErrorComment = comment[:ERROR_COMMENT_LENGTH]
    return status


def _tally(event: Event, outcome: IngestOutcome) -> None:
    with _tallies_lock:
        _tallies.setdefault(id(event.assoc), Counter())[outcome.status.value] += 1


# --- Association log ------------------------------------------------------------------------


def _peer(event: Event) -> str:
    requestor = event.assoc.requestor
    return f"AE {requestor.ae_title!r} at {requestor.address}:{requestor.port}"


def _log_accepted(event: Event) -> None:
    logger.info("Association accepted from %s", _peer(event))


def _log_rejected(event: Event) -> None:
    logger.warning("Association rejected from %s", _peer(event))


def _association_ended(event: Event) -> None:
    """Log what the association brought; close this thread's database connection with it."""
    with _tallies_lock:
        counts = _tallies.pop(id(event.assoc), Counter())
    how = "released" if event.event is evt.EVT_RELEASED else "aborted"
    summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "nothing"
    logger.info("Association %s by %s: %s", how, _peer(event), summary)
    connections.close_all()
