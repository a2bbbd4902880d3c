"""The DICOM receiver over real associations: pynetdicom (and dcmtk when installed) as senders."""

import io
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pydicom
import pytest
from django.conf import settings
from django.core.management import call_command
from pydicom.uid import (
    JPEG2000Lossless,
    JPEGLosslessSV1,
)
from pynetdicom import AE
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE

from tests.worklist.dicom_samples import (
    ct_without_pixels,
    part10,
    phantom_series,
    small_image,
    stub_scheduling,
)
from worklist.ingest import CANNOT_UNDERSTAND, DATA_SET_DOES_NOT_MATCH_SOP_CLASS
from worklist.models import AuditAction, AuditEvent, Instance, QuarantinedFile, Series, Study
from worklist.receiver import (
    RECEIVED_SOP_CLASSES,
    TCP_NODELAY_HANDLERS,
    TRANSFER_SYNTAXES,
    VERIFICATION,
    ReceiverServer,
    start_receiver,
)

AE_TITLE = "ICHTEST"
ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.django_db(transaction=True)


@contextmanager
def receiver_server(allowed: list[str] | None = None) -> Iterator[ReceiverServer]:
    server = start_receiver(
        host="127.0.0.1", port=0, ae_title=AE_TITLE, allowed_calling_aets=allowed, block=False
    )
    assert server is not None
    try:
        yield server
    finally:
        server.shutdown()


@contextmanager
def running_receiver(allowed: list[str] | None = None) -> Iterator[int]:
    with receiver_server(allowed) as server:
        yield int(server.server_address[1])


@pytest.fixture(autouse=True)
def scheduled(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    return stub_scheduling(monkeypatch)


@pytest.fixture
def port() -> Iterator[int]:
    with running_receiver() as listening:
        yield listening


def _sender(calling_ae: str = "TESTSCU") -> AE:
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(VERIFICATION)
    for sop_class in RECEIVED_SOP_CLASSES[:6]:
        for syntax in TRANSFER_SYNTAXES:  # one context each, so every syntax can be accepted
            ae.add_requested_context(sop_class, syntax)
    return ae


@contextmanager
def association(port: int, calling_ae: str = "TESTSCU") -> Iterator:  # type: ignore[type-arg]
    assoc = _sender(calling_ae).associate(
        "127.0.0.1", port, ae_title=AE_TITLE, evt_handlers=list(TCP_NODELAY_HANDLERS)
    )
    assert assoc.is_established
    try:
        yield assoc
    finally:
        assoc.release()


def _dataset(data: bytes) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(data))


def _meta_only(data: bytes) -> bytes:
    """The preamble and file meta of a Part-10 file, without its data set."""
    group_length = int(_dataset(data).file_meta.FileMetaInformationGroupLength)
    return data[: 132 + 12 + group_length]


def _write(folder: Path, name: str, data: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)
    return folder / name


def test_it_answers_c_echo(port: int) -> None:
    with association(port) as assoc:
        assert assoc.send_c_echo().Status == 0x0000


def test_a_phantom_series_sent_by_c_store_is_stored_indexed_and_audited(port: int) -> None:
    with association(port, calling_ae="CT_SCANNER") as assoc:
        statuses = [assoc.send_c_store(_dataset(data)).Status for data in phantom_series()]
    assert statuses == [0x0000] * len(phantom_series())
    study = Study.objects.get()
    assert Instance.objects.filter(series__study=study).count() == len(phantom_series())
    events = AuditEvent.objects.filter(action=AuditAction.INSTANCE_RECEIVED, study=study)
    assert events.count() == len(phantom_series())
    event = events.first()
    assert event is not None
    assert event.details == {"source": "c-store", "calling_ae": "CT_SCANNER", "outcome": "stored"}
    assert event.client_address == "127.0.0.1"


def test_the_received_bytes_are_stored_as_sent(port: int, tmp_path: Path) -> None:
    sent = _write(tmp_path, "IM1.dcm", phantom_series()[0])
    call_command("send_study", str(sent), port=port, ae_title=AE_TITLE, stdout=io.StringIO())
    received = _stored(Instance.objects.get())
    original = _dataset(phantom_series()[0])
    assert received.PixelData == original.PixelData
    assert received.SOPInstanceUID == original.SOPInstanceUID


def _stored(instance: Instance) -> pydicom.Dataset:
    return pydicom.dcmread(Path(settings.MEDIA_ROOT) / instance.path)


def test_a_resend_answers_success_and_changes_nothing(port: int) -> None:
    with association(port) as assoc:
        assoc.send_c_store(_dataset(phantom_series()[0]))
    with association(port) as assoc:
        assert assoc.send_c_store(_dataset(phantom_series()[0])).Status == 0x0000
    assert Instance.objects.count() == 1


def test_bad_files_are_refused_with_reasons_while_the_rest_is_stored(
    port: int, tmp_path: Path
) -> None:
    folder = tmp_path / "study"
    series = phantom_series()
    for index, data in enumerate(series):
        _write(folder, f"IM{index}.dcm", data)
    _write(folder, "truncated.dcm", series[0][:-2000])
    _write(folder, "malformed.dcm", _meta_only(series[0]) + b"\x08\x00\x16\x00UI\xff\xff" * 3)
    _write(folder, "mr.dcm", part10(small_image(modality="MR")))
    _write(folder, "no-pixels.dcm", part10(ct_without_pixels()))
    output, errors = io.StringIO(), io.StringIO()
    call_command(
        "send_study", str(folder), port=port, ae_title=AE_TITLE, stdout=output, stderr=errors
    )
    assert "6 accepted, 3 refused" in output.getvalue()
    refusals = errors.getvalue()
    assert f"truncated.dcm: 0x{CANNOT_UNDERSTAND:04X} truncated DICOM" in refusals
    assert f"malformed.dcm: 0x{CANNOT_UNDERSTAND:04X}" in refusals
    assert f"no-pixels.dcm: 0x{DATA_SET_DOES_NOT_MATCH_SOP_CLASS:04X} no pixel data" in refusals
    assert Instance.objects.count() == len(series) + 1
    assert set(Series.objects.values_list("modality", flat=True)) == {"CT", "MR"}
    assert QuarantinedFile.objects.count() == 3
    assert set(QuarantinedFile.objects.values_list("source", "calling_ae")) == {
        ("c-store", "ICH_SEND")
    }


def test_a_calling_ae_not_on_the_allow_list_is_rejected() -> None:
    with running_receiver(allowed=["CT_SCANNER"]) as port:
        refused = _sender("INTRUDER").associate("127.0.0.1", port, ae_title=AE_TITLE)
        assert refused.is_rejected
        with association(port, calling_ae="CT_SCANNER") as assoc:
            assert assoc.send_c_echo().Status == 0x0000


def test_jpeg_2000_is_received(port: int) -> None:
    dataset = _dataset(phantom_series()[1])
    dataset.compress(JPEG2000Lossless)
    with association(port) as assoc:
        assert assoc.send_c_store(dataset).Status == 0x0000
    stored = _stored(Instance.objects.get())
    assert stored.file_meta.TransferSyntaxUID == JPEG2000Lossless


def test_both_ends_turn_off_nagle(port: int) -> None:
    with association(port) as assoc:
        client = assoc.dul.socket.socket
        assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def _needs(tool: str) -> str:
    # pynetdicom installs apps of the same names (storescu, echoscu) into the virtualenv: look
    # for dcmtk's outside it.
    outside_venv = os.pathsep.join(
        d
        for d in os.environ.get("PATH", "").split(os.pathsep)
        if not Path(d).resolve().is_relative_to(Path(sys.prefix).resolve())
    )
    found = shutil.which(tool, path=outside_venv)
    if found is None:
        pytest.skip(f"dcmtk's {tool} is not installed (apt-get install dcmtk)")
    return found


def test_jpeg_lossless_from_dcmtk_is_received(port: int, tmp_path: Path) -> None:
    dcmcjpeg = _needs("dcmcjpeg")
    source = _write(tmp_path, "plain.dcm", phantom_series()[2])
    compressed = tmp_path / "sv1.dcm"
    subprocess.run([dcmcjpeg, "+e1", "+sr", str(source), str(compressed)], check=True)
    assert _dataset(compressed.read_bytes()).file_meta.TransferSyntaxUID == JPEGLosslessSV1
    call_command("send_study", str(compressed), port=port, ae_title=AE_TITLE, stdout=io.StringIO())
    stored = _stored(Instance.objects.get())
    assert stored.file_meta.TransferSyntaxUID == JPEGLosslessSV1
    assert (stored.pixel_array == _dataset(phantom_series()[2]).pixel_array).all()


def test_dcmtk_storescu_and_echoscu_are_answered(port: int, tmp_path: Path) -> None:
    storescu, echoscu = _needs("storescu"), _needs("echoscu")
    echo = [echoscu, "-aet", "DCMTK", "-aec", AE_TITLE, "127.0.0.1", str(port)]
    subprocess.run(echo, check=True, timeout=60)
    folder = tmp_path / "study"
    for index, data in enumerate(phantom_series()):
        _write(folder, f"IM{index}.dcm", data)
    store = [
        storescu,
        "-aet",
        "DCMTK",
        "-aec",
        AE_TITLE,
        "+sd",
        "127.0.0.1",
        str(port),
        str(folder),
    ]
    result = subprocess.run(store, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert Instance.objects.count() == len(phantom_series())


def test_the_receiver_command_refuses_a_bad_ae_title() -> None:
    result = subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=ROOT,
        env={**os.environ, "ICH_DICOM_AE_TITLE": "A\\B"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode != 0
    assert "ICH_DICOM_AE_TITLE" in result.stderr


def test_idle_connections_do_not_lock_scanners_out(port: int) -> None:
    """pynetdicom's default of 10 associations let ten idle sockets (no association request
    sent) refuse every sender for 30 s at a time; the receiver now allows
    ICH_DICOM_MAX_ASSOCIATIONS and drops a silent connection after
    ICH_DICOM_ASSOCIATION_TIMEOUT_SECONDS."""
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(12)]
    try:
        with association(port) as assoc:
            assert assoc.send_c_echo().Status == 0x0000
    finally:
        for connection in idle:
            connection.close()


def test_an_instance_is_spooled_to_disk_as_it_arrives_and_stored_as_sent(
    port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fragments go to a temporary file, not memory (STORE_RECV_CHUNKED_DATASET): a large or
    never-finished data set costs disk, not the receiver's RAM."""
    from worklist import receiver

    spooled: list[str] = []
    real = receiver._received_bytes

    def spy(event: object) -> bytes:
        spooled.append(getattr(event, "dataset_path", None))  # type: ignore[arg-type]
        return real(event)  # type: ignore[arg-type]

    monkeypatch.setattr(receiver, "_received_bytes", spy)
    data = phantom_series()[0]
    with association(port) as assoc:
        assert assoc.send_c_store(_dataset(data)).Status == 0x0000
    assert len(spooled) == 1 and spooled[0] is not None
    stored = Path(settings.MEDIA_ROOT) / Instance.objects.get().path
    assert _dataset(stored.read_bytes()).PixelData == _dataset(data).PixelData


def _wait_for(condition: Callable[[], bool], seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


@pytest.fixture
def spool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where the receiver spools arriving instances (pynetdicom's temporary files)."""
    folder = tmp_path / "spool"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def test_one_address_cannot_take_every_association(settings: Any) -> None:
    """ICH_DICOM_MAX_ASSOCIATIONS_PER_ADDRESS: past it, a further connection from the same
    address is closed unread; when its connections close, the address may send again."""
    settings.ICH_DICOM_MAX_ASSOCIATIONS_PER_ADDRESS = 2
    with receiver_server() as server:
        port = int(server.server_address[1])
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
        assert _wait_for(lambda: server.open_connections("127.0.0.1") == 2)
        refused = _sender().associate("127.0.0.1", port, ae_title=AE_TITLE)
        assert not refused.is_established
        for connection in idle:
            connection.close()
        # (a closed idle socket may be noticed only at the ACSE timeout, 10 s)
        assert _wait_for(lambda: server.open_connections("127.0.0.1") == 0, seconds=30)
        with association(port) as assoc:
            assert assoc.send_c_echo().Status == 0x0000


def test_an_instance_over_the_size_limit_is_aborted_as_it_arrives(
    settings: Any, spool: Path
) -> None:
    """ICH_DICOM_MAX_INSTANCE_MB: a C-STORE growing past it is aborted before the rest is
    written, nothing is stored and its spool file is removed; a smaller instance still goes."""
    settings.ICH_DICOM_MAX_INSTANCE_MB = 1
    large = small_image(rows=1024, columns=1024)  # 2 MiB of pixels
    with running_receiver() as port:
        assoc = _sender().associate("127.0.0.1", port, ae_title=AE_TITLE)
        assert assoc.is_established
        assert "Status" not in assoc.send_c_store(large)  # no answer: aborted
        assert _wait_for(lambda: assoc.is_aborted)
        assert _wait_for(lambda: not list(spool.iterdir()))
        assert not Instance.objects.exists() and not QuarantinedFile.objects.exists()
        with association(port) as again:
            assert again.send_c_store(small_image(rows=256, columns=256)).Status == 0x0000
    assert Instance.objects.count() == 1


@pytest.mark.parametrize("how", ["abort", "close"])
def test_an_instance_cut_off_leaves_no_spool_file(spool: Path, how: str) -> None:
    """A peer that aborts, or drops its connection, in the middle of an instance: pynetdicom
    removes a spool file only after the C-STORE is answered, so the receiver removes it."""
    data = phantom_series()[0]
    dataset = _dataset(data)
    syntax = dataset.file_meta.TransferSyntaxUID
    with running_receiver() as port:
        assoc = _sender().associate("127.0.0.1", port, ae_title=AE_TITLE)
        assert assoc.is_established
        context = next(
            cx
            for cx in assoc.accepted_contexts
            if cx.abstract_syntax == dataset.SOPClassUID and cx.transfer_syntax[0] == syntax
        )
        request = C_STORE()
        request.MessageID = 1
        request.AffectedSOPClassUID = dataset.SOPClassUID
        request.AffectedSOPInstanceUID = dataset.SOPInstanceUID
        request.Priority = 2
        request.DataSet = io.BytesIO(data[len(_meta_only(data)) :])
        message = C_STORE_RQ()
        message.primitive_to_message(request)
        fragments = list(message.encode_msg(context.context_id, 16384))
        assert len(fragments) > 3
        for fragment in fragments[:-2]:  # the command and part of the data set
            assoc.dul.send_pdu(fragment)
        assert _wait_for(lambda: len(list(spool.iterdir())) == 1)
        if how == "abort":
            assoc.abort()
        else:
            assert assoc.dul.socket is not None and assoc.dul.socket.socket is not None
            assoc.dul.socket.socket.shutdown(socket.SHUT_RDWR)
            assoc.dul.socket.socket.close()
            assoc.kill()
        assert _wait_for(lambda: not list(spool.iterdir()))
    assert not Instance.objects.exists()


def test_a_pdu_longer_than_the_receiver_reads_is_cut_off_unread() -> None:
    """pynetdicom reads a PDU of any declared length (up to 4 GiB) into memory before looking
    at it; the receiver cuts the connection off at the header instead."""
    with receiver_server() as server:
        port = int(server.server_address[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
            connection.sendall(struct.pack(">BBL", 0x01, 0, 100_000_000) + b"\x00" * 1024)
            assert connection.recv(1) == b""  # closed by the receiver, not waiting for 100 MB
        assert _wait_for(lambda: server.open_connections("127.0.0.1") == 0)
        with association(port) as assoc:
            assert assoc.send_c_echo().Status == 0x0000


def test_a_peer_that_stalls_in_the_middle_of_a_pdu_is_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An accepted socket had no timeout, so a peer that sent part of a PDU and went silent
    held its thread, and a place under ICH_DICOM_MAX_ASSOCIATIONS_PER_ADDRESS, for good. It
    now times out after the AE's network timeout (60 s; 2 s here)."""
    from worklist import receiver

    original = receiver.build_receiver

    def quick(**kwargs: Any) -> AE:
        ae = original(**kwargs)
        ae.network_timeout = 2
        return ae

    monkeypatch.setattr(receiver, "build_receiver", quick)
    with receiver_server() as server:
        port = int(server.server_address[1])
        with socket.create_connection(("127.0.0.1", port), timeout=20) as connection:
            connection.sendall(struct.pack(">BBL", 0x01, 0, 1000) + b"\x00" * 10)
            assert _wait_for(lambda: server.open_connections("127.0.0.1") == 1)
            assert connection.recv(1) == b""
        assert _wait_for(lambda: server.open_connections("127.0.0.1") == 0)
