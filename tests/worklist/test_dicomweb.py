"""DICOMweb: STOW-RS in with real multipart bodies, QIDO-RS search, WADO-RS retrieve."""

import base64
import io
import json
from typing import Any

import numpy as np
import pydicom
import pytest
from django.http import HttpResponse, StreamingHttpResponse
from django.test import Client
from django.utils.http import parse_header_parameters

from tests.worklist.dicom_samples import (
    PATIENT_ID,
    PATIENT_NAME,
    part10,
    phantom_series,
    small_image,
    stub_scheduling,
)
from worklist.dicomweb import iter_multipart_related
from worklist.ingest import CANNOT_UNDERSTAND, instance_ingest
from worklist.models import AuditAction, AuditEvent, Instance, Study
from worklist.roles import RADIOLOGIST

pytestmark = pytest.mark.django_db
BOUNDARY = "ichtriage-test-boundary"
STOW_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'


@pytest.fixture(autouse=True)
def scheduled(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    return stub_scheduling(monkeypatch)


def multipart(*parts: bytes, content_type: str = "application/dicom") -> bytes:
    body = b"".join(
        f"--{BOUNDARY}\r\nContent-Type: {content_type}\r\n\r\n".encode() + part + b"\r\n"
        for part in parts
    )
    return body + f"--{BOUNDARY}--\r\n".encode()


def parts_of(response: HttpResponse | StreamingHttpResponse) -> list[tuple[str, bytes]]:
    """The parts of a multipart/related response, split independently of the app's reader."""
    _, params = parse_header_parameters(response["Content-Type"])
    delimiter = f"--{params['boundary']}".encode()
    body = b"".join(response.streaming_content) if response.streaming else response.content
    chunks = body.split(b"\r\n" + delimiter)
    assert body.startswith(delimiter) and chunks[-1] == b"--\r\n"
    parts = []
    for chunk in [chunks[0][len(delimiter) :], *chunks[1:-1]]:
        head, content = chunk.split(b"\r\n\r\n", 1)
        content_type = head.decode().split("Content-Type:", 1)[1].strip()
        parts.append((content_type, content))
    return parts


def stow(client: Client, body: bytes, url: str = "/dicomweb/studies", **extra: Any) -> Any:
    return client.post(url, data=body, content_type=STOW_TYPE, **extra)


def _stored_study() -> Study:
    for data in phantom_series():
        instance_ingest(data=data, source="upload", address=None)
    return Study.objects.get()


def _uids(data: bytes) -> tuple[str, str, str]:
    header = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    return header.StudyInstanceUID, header.SeriesInstanceUID, header.SOPInstanceUID


def _instance_url(data: bytes) -> str:
    study, series, sop = _uids(data)
    return f"/dicomweb/studies/{study}/series/{series}/instances/{sop}"


class TestStowRs:
    def test_a_multipart_body_is_stored_and_answered_with_references(
        self, radiologist_client: Client
    ) -> None:
        response = stow(radiologist_client, multipart(*phantom_series()))
        assert response.status_code == 200
        assert response["Content-Type"] == "application/dicom+json"
        body = response.json()
        referenced = body["00081199"]["Value"]
        assert len(referenced) == len(phantom_series())
        first = referenced[0]
        assert first["00081155"]["Value"] == [_uids(phantom_series()[0])[2]]
        assert first["00081190"]["Value"][0].endswith(_instance_url(phantom_series()[0]))
        study_uid = _uids(phantom_series()[0])[0]
        assert body["00081190"]["Value"] == [f"http://testserver/dicomweb/studies/{study_uid}"]
        assert Instance.objects.count() == len(phantom_series())

    def test_each_instance_is_audited_as_received_by_stow_from_its_user(
        self, radiologist_client: Client
    ) -> None:
        stow(radiologist_client, multipart(phantom_series()[0]))
        event = AuditEvent.objects.get(action=AuditAction.INSTANCE_RECEIVED)
        assert event.details["source"] == "stow-rs"
        assert event.user is not None

    def test_one_bad_part_gives_202_with_its_failure_reason(
        self, radiologist_client: Client
    ) -> None:
        series = phantom_series()
        response = stow(radiologist_client, multipart(series[0], series[1][:-999], series[2]))
        assert response.status_code == 202
        body = response.json()
        assert len(body["00081199"]["Value"]) == 2
        (failed,) = body["00081198"]["Value"]
        assert failed["00081197"]["Value"] == [CANNOT_UNDERSTAND]
        assert failed["00081155"]["Value"] == [_uids(series[1])[2]]
        assert "truncated" in response["Warning"]
        assert Instance.objects.count() == 2

    def test_nothing_stored_is_a_409(self, radiologist_client: Client) -> None:
        response = stow(radiologist_client, multipart(b"not dicom", b"nor this"))
        assert response.status_code == 409
        assert len(response.json()["00081198"]["Value"]) == 2

    def test_a_resend_is_a_success(self, radiologist_client: Client) -> None:
        stow(radiologist_client, multipart(phantom_series()[0]))
        again = stow(radiologist_client, multipart(phantom_series()[0]))
        assert again.status_code == 200
        assert Instance.objects.count() == 1

    def test_a_study_url_takes_only_that_study(self, radiologist_client: Client) -> None:
        study_uid = _uids(phantom_series()[0])[0]
        other = part10(small_image())
        response = stow(
            radiologist_client,
            multipart(phantom_series()[0], other),
            url=f"/dicomweb/studies/{study_uid}",
        )
        assert response.status_code == 202
        assert "is not the study" in response["Warning"]

    def test_a_part_that_is_not_application_dicom_is_refused(
        self, radiologist_client: Client
    ) -> None:
        body = multipart(b"{}", content_type="application/dicom+json")
        response = stow(radiologist_client, body)
        assert response.status_code == 409
        assert response.json()["0008119A"]["Value"][0]["00081197"]["Value"] == [CANNOT_UNDERSTAND]

    @pytest.mark.parametrize(
        "content_type",
        ["application/json", 'multipart/related; type="application/dicom+json"; boundary=x'],
    )
    def test_other_media_types_are_415(self, radiologist_client: Client, content_type: str) -> None:
        response = radiologist_client.post(
            "/dicomweb/studies", data=b"{}", content_type=content_type
        )
        assert response.status_code == 415

    def test_a_body_without_its_closing_delimiter_is_a_400(
        self, radiologist_client: Client
    ) -> None:
        body = f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\nabc".encode()
        assert stow(radiologist_client, body).status_code == 400

    def test_an_ed_physician_may_not_store(self, ed_client: Client) -> None:
        assert stow(ed_client, multipart(phantom_series()[0])).status_code == 403
        assert Instance.objects.count() == 0


class TestAuthentication:
    def _basic(self, username: str, password: str) -> dict[str, str]:
        token = base64.b64encode(f"{username}:{password}".encode()).decode()
        return {"HTTP_AUTHORIZATION": f"Basic {token}"}

    def test_a_machine_client_stores_with_basic_auth_and_no_csrf_token(
        self, user_with_role: Any
    ) -> None:
        user_with_role(RADIOLOGIST, username="pacs")
        client = Client(enforce_csrf_checks=True)
        credentials = self._basic("pacs", "correct-horse-battery-9")
        response = stow(client, multipart(phantom_series()[0]), **credentials)
        assert response.status_code == 200
        assert AuditEvent.objects.get(action=AuditAction.INSTANCE_RECEIVED).username == "pacs"

    def test_basic_auth_still_needs_the_role(self, user_with_role: Any) -> None:
        user_with_role(None, username="nobody")
        credentials = self._basic("nobody", "correct-horse-battery-9")
        assert stow(Client(), multipart(b"x"), **credentials).status_code == 403

    def test_a_wrong_password_is_401_and_recorded_as_a_failed_login(
        self, user_with_role: Any
    ) -> None:
        user_with_role(RADIOLOGIST, username="pacs")
        response = stow(Client(), multipart(b"x"), **self._basic("pacs", "wrong"))
        assert response.status_code == 401
        assert AuditEvent.objects.filter(action=AuditAction.LOGIN_FAILED, username="pacs").exists()

    def test_a_session_client_needs_its_csrf_token(self, user_with_role: Any) -> None:
        client = Client(enforce_csrf_checks=True)
        client.force_login(user_with_role(RADIOLOGIST))
        response = stow(client, multipart(phantom_series()[0]))
        assert response.status_code == 403
        assert "CSRF" in response.json()["detail"]

    def test_anonymous_requests_are_401(self) -> None:
        client = Client()
        assert client.get("/dicomweb/studies").status_code == 401
        assert stow(client, multipart(b"x")).status_code == 401


class TestQidoRs:
    def test_a_stored_study_is_found_with_its_attributes(self, ed_client: Client) -> None:
        study = _stored_study()
        response = ed_client.get("/dicomweb/studies", HTTP_ACCEPT="application/dicom+json")
        assert response.status_code == 200
        assert response["Content-Type"] == "application/dicom+json"
        (found,) = response.json()
        assert found["0020000D"]["Value"] == [study.study_instance_uid]
        assert found["00100010"]["Value"] == [{"Alphabetic": PATIENT_NAME}]
        assert found["00100020"]["Value"] == [PATIENT_ID]
        assert found["00080061"]["Value"] == ["CT"]
        assert found["00201206"]["Value"] == [1]
        assert found["00201208"]["Value"] == [len(phantom_series())]
        assert found["00081190"]["Value"][0].endswith(f"/studies/{study.study_instance_uid}")

    @pytest.mark.parametrize(
        ("query", "found"),
        [
            ({"PatientID": PATIENT_ID}, 1),
            ({"00100020": PATIENT_ID}, 1),
            ({"PatientID": "someone-else"}, 0),
            ({"PatientName": "secret*"}, 1),
            ({"ModalitiesInStudy": "CT"}, 1),
            ({"ModalitiesInStudy": "MR"}, 0),
            ({"StudyDate": "20240101-20251231"}, 1),
            ({"StudyDate": "19900101-19901231"}, 0),
            ({"limit": "1", "offset": "1"}, 0),
        ],
    )
    def test_studies_are_matched_on_the_common_keys(
        self, ed_client: Client, query: dict[str, str], found: int
    ) -> None:
        study = _stored_study()
        accession = {"AccessionNumber": study.accession_number}
        assert len(ed_client.get("/dicomweb/studies", accession).json()) == 1
        assert len(ed_client.get("/dicomweb/studies", query).json()) == found

    @pytest.mark.parametrize(
        "query",
        [{"StudyID": "NO-SUCH-STUDY"}, {"00200010": "X"}, {"ReferringPhysicianName": "SMITH^A"}],
    )
    def test_a_key_it_cannot_match_on_is_refused_not_ignored(
        self, ed_client: Client, query: dict[str, str]
    ) -> None:
        """Ignored, a narrow search would be answered with every study, other patients' too."""
        _stored_study()
        response = ed_client.get("/dicomweb/studies", query)
        assert response.status_code == 400
        assert "does not match studies on" in response.json()["detail"]
        assert "PatientID" in response.json()["detail"]  # what it does match on
        # sent empty, a key asks for nothing to be matched; includefield is no matching key
        empty = {next(iter(query)): "", "includefield": "00081030", "fuzzymatching": "false"}
        assert len(ed_client.get("/dicomweb/studies", empty).json()) == 1

    def test_a_study_is_found_and_shown_on_its_own_date_whatever_the_sites_zone(
        self, ed_client: Client, settings: Any
    ) -> None:
        """00:30 on 2 January at +0200 is 22:30 on 1 January in UTC (the site's zone here):
        the study was found and shown under 1 January, not the date its header gives."""
        settings.TIME_ZONE = "UTC"
        dataset = pydicom.dcmread(io.BytesIO(phantom_series()[0]))
        dataset.StudyDate, dataset.StudyTime = "20250102", "003000"
        dataset.TimezoneOffsetFromUTC = "+0200"
        buffer = io.BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        instance_ingest(data=buffer.getvalue(), source="upload", address=None)
        (found,) = ed_client.get("/dicomweb/studies", {"StudyDate": "20250102"}).json()
        assert found["00080020"]["Value"] == ["20250102"]
        assert found["00080030"]["Value"] == ["003000"]
        assert ed_client.get("/dicomweb/studies", {"StudyDate": "20250101"}).json() == []

    def test_series_and_instances_of_a_study_are_listed(self, ed_client: Client) -> None:
        study = _stored_study()
        series = ed_client.get(f"/dicomweb/studies/{study.study_instance_uid}/series").json()
        assert [s["00080060"]["Value"] for s in series] == [["CT"]]
        series_uid = series[0]["0020000E"]["Value"][0]
        url = f"/dicomweb/studies/{study.study_instance_uid}/series/{series_uid}/instances"
        instances = ed_client.get(url).json()
        assert len(instances) == len(phantom_series())
        assert {i["00080018"]["Value"][0] for i in instances} == set(
            Instance.objects.values_list("sop_instance_uid", flat=True)
        )

    def test_a_query_is_audited_with_its_keys_but_not_their_values(self, ed_client: Client) -> None:
        study = _stored_study()
        ed_client.get("/dicomweb/studies", {"PatientID": PATIENT_ID})
        ed_client.get(f"/dicomweb/studies?{PATIENT_ID}")  # a value sent as a bare key
        first, second = AuditEvent.objects.filter(action=AuditAction.DICOMWEB_QUERY).order_by("id")
        assert first.details == {
            "level": "studies",
            "keys": ["PatientID"],
            "results": 1,
            "study_ids": [study.pk],
        }
        assert first.study == study
        assert second.details["keys"] == ["(other)"]
        for event in (first, second):
            assert PATIENT_ID not in json.dumps(event.details)

    def test_a_series_or_instance_query_is_audited_against_its_study(
        self, ed_client: Client
    ) -> None:
        study = _stored_study()
        series = ed_client.get(f"/dicomweb/studies/{study.study_instance_uid}/series").json()
        series_uid = series[0]["0020000E"]["Value"][0]
        url = f"/dicomweb/studies/{study.study_instance_uid}/series/{series_uid}/instances"
        ed_client.get(url)
        events = AuditEvent.objects.filter(action=AuditAction.DICOMWEB_QUERY).order_by("id")
        assert [(e.details["level"], e.study) for e in events] == [
            ("series", study),
            ("instances", study),
        ]

    def test_a_bad_date_is_a_400(self, ed_client: Client) -> None:
        assert ed_client.get("/dicomweb/studies", {"StudyDate": "yesterday"}).status_code == 400


class TestWadoRs:
    def test_an_instance_comes_back_exactly_as_stored(self, ed_client: Client) -> None:
        _stored_study()
        data = phantom_series()[0]
        response = ed_client.get(_instance_url(data))
        assert response.status_code == 200
        assert response["Content-Type"].startswith('multipart/related; type="application/dicom"')
        ((content_type, content),) = parts_of(response)
        assert content_type == "application/dicom; transfer-syntax=1.2.840.10008.1.2.1"
        assert content == data

    def test_a_series_and_a_study_come_back_whole(self, ed_client: Client) -> None:
        _stored_study()
        study_uid, series_uid, _ = _uids(phantom_series()[0])
        for url in (
            f"/dicomweb/studies/{study_uid}",
            f"/dicomweb/studies/{study_uid}/series/{series_uid}",
        ):
            contents = {content for _, content in parts_of(ed_client.get(url))}
            assert contents == set(phantom_series())

    def test_metadata_is_the_header_without_pixel_data(self, ed_client: Client) -> None:
        _stored_study()
        response = ed_client.get(_instance_url(phantom_series()[0]) + "/metadata")
        assert response["Content-Type"] == "application/dicom+json"
        (metadata,) = response.json()
        assert "7FE00010" not in metadata
        assert metadata["00100010"]["Value"] == [{"Alphabetic": PATIENT_NAME}]
        assert metadata["00280010"]["Value"] == [512]
        study_uid = _uids(phantom_series()[0])[0]
        series = ed_client.get(f"/dicomweb/studies/{study_uid}/metadata").json()
        assert len(series) == len(phantom_series())

    def test_a_frame_comes_back_uncompressed(self, ed_client: Client) -> None:
        _stored_study()
        data = phantom_series()[0]
        response = ed_client.get(_instance_url(data) + "/frames/1")
        ((content_type, frame),) = parts_of(response)
        assert content_type.startswith("application/octet-stream")
        assert frame == pydicom.dcmread(io.BytesIO(data)).PixelData
        single = ed_client.get(
            _instance_url(data) + "/frames/1", HTTP_ACCEPT="application/octet-stream"
        )
        assert single.content == frame

    def test_a_compressed_frame_is_decoded(self, ed_client: Client) -> None:
        dataset = pydicom.dcmread(io.BytesIO(phantom_series()[3]))
        dataset.compress(pydicom.uid.JPEG2000Lossless)
        data = part10(dataset)
        instance_ingest(data=data, source="upload", address=None)
        ((_, frame),) = parts_of(ed_client.get(_instance_url(data) + "/frames/1"))
        expected = pydicom.dcmread(io.BytesIO(phantom_series()[3])).pixel_array
        decoded = np.frombuffer(frame, dtype=expected.dtype.newbyteorder("<"))
        assert np.array_equal(decoded.reshape(512, 512), expected)

    def test_frames_of_a_multi_frame_image(self, ed_client: Client) -> None:
        data = part10(small_image(rows=4, columns=4, frames=3))
        instance_ingest(data=data, source="upload", address=None)
        parts = parts_of(ed_client.get(_instance_url(data) + "/frames/3,1"))
        pixels = np.arange(48, dtype="<u2")
        assert [content for _, content in parts] == [pixels[32:].tobytes(), pixels[:16].tobytes()]
        assert ed_client.get(_instance_url(data) + "/frames/4").status_code == 404

    def test_an_unknown_instance_is_a_404(self, ed_client: Client) -> None:
        _stored_study()
        study_uid, series_uid, _ = _uids(phantom_series()[0])
        url = f"/dicomweb/studies/{study_uid}/series/{series_uid}/instances/1.2.3"
        assert ed_client.get(url).status_code == 404
        assert ed_client.get("/dicomweb/studies/1.2.3").status_code == 404

    def test_each_retrieval_is_audited_against_the_study(self, ed_client: Client) -> None:
        study = _stored_study()
        b"".join(ed_client.get(_instance_url(phantom_series()[0])).streaming_content)
        event = AuditEvent.objects.get(action=AuditAction.DICOMWEB_RETRIEVE)
        assert event.study == study
        assert event.details["what"] == "instances" and event.details["instances"] == 1


def test_the_multipart_reader_takes_any_chunking_and_transport_padding() -> None:
    body = (
        b"preamble\r\n--b \t\r\nContent-Type: application/dicom\r\n\r\nfirst\r\n--b\r\n"
        b"\r\nsecond\r\n\r\n--b--\r\nepilogue"
    )

    class Trickle(io.BytesIO):
        def read(self, size: int | None = -1) -> bytes:
            return super().read(3)

    parts = list(iter_multipart_related(Trickle(body), boundary=b"b", limit=10_000))
    assert [(p.content_type, p.data) for p in parts] == [
        ("application/dicom", b"first"),
        ("application/dicom", b"second\r\n"),
    ]
