"""DICOMweb (PS3.18) for stored studies: STOW-RS in, QIDO-RS search, WADO-RS retrieve.

Any DICOMweb client (the project's viewer, OHIF, a script) can store, find and open studies
here. Every endpoint needs a login and a role: reading needs the ED physician role, storing the
radiologist role. Browsers use their session (with CSRF on writes); machine clients may send
HTTP Basic credentials of a Django user instead (throttled by django-axes like the login page,
with no CSRF since no cookie is involved). Every query, retrieval and stored instance is audited;
the audit keeps which query keys were used, not their values, so patient names and ids typed into
a search stay out of the log.

Stored files are served exactly as received. Frames are served uncompressed (decoded when the
file is compressed). Metadata is the header as DICOM JSON without the pixel data.
"""

import json
import re
import secrets
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import IO, Any, cast

import pydicom
from django.conf import settings
from django.contrib.postgres.aggregates import ArrayAgg
from django.db import transaction
from django.db.models import Count, Exists, OuterRef, Q, QuerySet, Value
from django.http import HttpResponse, StreamingHttpResponse
from django.urls import path, reverse
from django.utils.http import parse_header_parameters
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.utils import extend_schema
from pydicom.datadict import keyword_for_tag
from pydicom.filereader import read_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian
from rest_framework import authentication, permissions, renderers
from rest_framework.exceptions import (
    AuthenticationFailed,
    NotFound,
    ParseError,
    UnsupportedMediaType,
    ValidationError,
)
from rest_framework.negotiation import DefaultContentNegotiation
from rest_framework.parsers import BaseParser
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from worklist import ingest, services
from worklist.media import instance_file_path
from worklist.models import AuditAction, IngestSource, Instance, Series, Study
from worklist.roles import ED_PHYSICIAN, RADIOLOGIST, SessionAuthentication, has_role
from worklist.streaming import streamed

DICOM_JSON = "application/dicom+json"
DICOM = "application/dicom"
OCTET_STREAM = "application/octet-stream"
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
READ_CHUNK = 1024 * 1024
MAX_WARNING_HEADERS = 20


# --- Authentication, roles, content types ---------------------------------------------------


class BasicAuthentication(authentication.BasicAuthentication):
    """HTTP Basic against Django users, for DICOMweb clients that are not a browser session.

    Each failure is recorded like a failed login; django-axes counts it toward the lockout.
    """

    www_authenticate_realm = "ich-triage"

    def authenticate_credentials(self, userid: str, password: str, request: Any = None) -> Any:
        try:
            return super().authenticate_credentials(userid, password, request)
        except AuthenticationFailed:
            if request is not None:
                services.login_failure_record(request=request._request, username=userid)
            raise


class BasicAuthenticationScheme(OpenApiAuthenticationExtension):  # for the OpenAPI schema
    target_class = BasicAuthentication
    name = "basicAuth"

    def get_security_definition(self, auto_schema: Any) -> dict[str, str]:
        return {"type": "http", "scheme": "basic"}


class ReadsOrStores(permissions.BasePermission):
    """Reading (QIDO-RS, WADO-RS) needs the ED physician role; storing (STOW-RS) a radiologist."""

    required_role = ED_PHYSICIAN

    def has_permission(self, request: Request, view: Any) -> bool:
        reading = request.method in permissions.SAFE_METHODS
        return has_role(request.user, ED_PHYSICIAN if reading else RADIOLOGIST)


class DicomJsonRenderer(renderers.JSONRenderer):
    media_type = DICOM_JSON
    format = "dicomjson"


class OneRepresentation(DefaultContentNegotiation):
    """Each DICOMweb resource has one representation; clients phrase Accept in many ways
    (with transfer-syntax, charset, q-values), so none of them earns a 406."""

    def select_renderer(self, request: Any, renderers: Any, format_suffix: Any = None) -> Any:
        return renderers[0], renderers[0].media_type


class MultipartRelatedParser(BaseParser):
    """multipart/related; type="application/dicom": the body parts, read lazily one by one."""

    media_type = "multipart/related"

    def parse(self, stream: Any, media_type: Any = None, parser_context: Any = None) -> Any:
        _, params = parse_header_parameters(media_type or "")
        if params.get("type", "").lower() != DICOM:
            raise UnsupportedMediaType(
                media_type, detail='Only type="application/dicom" is stored.'
            )
        boundary = params.get("boundary", "")
        if not boundary:
            raise ParseError("The multipart/related Content-Type has no boundary.")
        return iter_multipart_related(
            stream, boundary=boundary.encode("latin-1"), limit=_max_body_bytes()
        )


def _max_body_bytes() -> int:
    return int(settings.ICH_UPLOAD_MAX_MB) * 1024 * 1024


class DicomwebView(APIView):
    # Session first: its 401 challenge is not "Basic", so a browser whose session ended gets an
    # error to handle rather than a native password prompt. Basic clients send credentials
    # up front (curl -u, DICOMweb libraries), as they must anyway for STOW-RS.
    authentication_classes = [SessionAuthentication, BasicAuthentication]
    permission_classes = [ReadsOrStores]
    renderer_classes = [DicomJsonRenderer]
    content_negotiation_class = OneRepresentation


# --- multipart/related ----------------------------------------------------------------------


class MultipartError(ValueError):
    pass


@dataclass(frozen=True)
class BodyPart:
    content_type: str  # the media type, lower case, without parameters
    data: bytes


def iter_multipart_related(stream: IO[bytes], *, boundary: bytes, limit: int) -> Iterator[BodyPart]:
    """Yield the parts of a multipart body (RFC 2046) as they are read, holding one at a time."""
    reader = _LimitedReader(stream, limit)
    delimiter = b"\r\n--" + boundary
    buffer = bytearray(b"\r\n")  # so that a body starting with the delimiter matches it
    del buffer[: _find(reader, buffer, delimiter) + len(delimiter)]  # and skip any preamble
    while True:
        _fill(reader, buffer, 2)
        if buffer[:2] == b"--":
            return
        line_end = _find(reader, buffer, b"\r\n")
        if buffer[:line_end].strip(b" \t"):
            raise MultipartError("malformed multipart delimiter line")
        del buffer[: line_end + 2]
        headers = _part_headers(reader, buffer)
        body_end = _find(reader, buffer, delimiter)
        content_type, _ = parse_header_parameters(headers.get("content-type", DICOM))
        yield BodyPart(content_type.lower(), bytes(buffer[:body_end]))
        del buffer[: body_end + len(delimiter)]


class _LimitedReader:
    def __init__(self, stream: IO[bytes] | None, limit: int) -> None:
        self.stream, self.left = stream, limit

    def read(self) -> bytes:
        chunk = self.stream.read(READ_CHUNK) if self.stream is not None else b""
        self.left -= len(chunk)
        if self.left < 0:
            raise MultipartError("the request body is larger than ICH_UPLOAD_MAX_MB allows")
        return chunk


def _find(reader: _LimitedReader, buffer: bytearray, needle: bytes) -> int:
    start = 0
    while (found := buffer.find(needle, start)) < 0:
        start = max(0, len(buffer) - len(needle) + 1)
        chunk = reader.read()
        if not chunk:
            raise MultipartError("the multipart body ends before its closing delimiter")
        buffer += chunk
    return found


def _fill(reader: _LimitedReader, buffer: bytearray, size: int) -> None:
    while len(buffer) < size:
        chunk = reader.read()
        if not chunk:
            raise MultipartError("the multipart body ends before its closing delimiter")
        buffer += chunk


def _part_headers(reader: _LimitedReader, buffer: bytearray) -> dict[str, str]:
    _fill(reader, buffer, 2)
    if buffer[:2] == b"\r\n":  # a part without headers
        del buffer[:2]
        return {}
    end = _find(reader, buffer, b"\r\n\r\n")
    lines = bytes(buffer[:end]).decode("latin-1").split("\r\n")
    del buffer[: end + 4]
    return {
        name.strip().lower(): value.strip()
        for name, _, value in (line.partition(":") for line in lines)
    }


def multipart_stream(
    parts: Iterable[tuple[str, Callable[[], Iterable[bytes]]]], *, boundary: str
) -> Iterator[bytes]:
    """The body of a multipart/related response; each part's content is produced when sent."""
    for content_type, content in parts:
        yield f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode("latin-1")
        yield from content()
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode("latin-1")


def _multipart_response(
    parts: Iterable[tuple[str, Callable[[], Iterable[bytes]]]],
    *,
    part_type: str,
    request: Request | None = None,
) -> StreamingHttpResponse:
    boundary = secrets.token_hex(16)
    response = StreamingHttpResponse(
        multipart_stream(parts, boundary=boundary),
        content_type=f'multipart/related; type="{part_type}"; boundary={boundary}',
    )
    return streamed(response, request) if request is not None else response


def _file_chunks(path: Path) -> Callable[[], Iterator[bytes]]:
    def chunks() -> Iterator[bytes]:
        with path.open("rb") as stream:
            while chunk := stream.read(READ_CHUNK):
                yield chunk

    return chunks


# --- DICOM JSON -----------------------------------------------------------------------------


def _element(vr: str, *values: Any) -> dict[str, Any]:
    present = [v for v in values if v not in (None, "")]
    return {"vr": vr, "Value": present} if present else {"vr": vr}


def _person_name(name: str) -> dict[str, Any]:
    return _element("PN", {"Alphabetic": name} if name else None)


def _url(request: Request, name: str, **kwargs: str) -> str:
    return request.build_absolute_uri(reverse(name, kwargs=kwargs))


# --- STOW-RS --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _OtherFailure:
    reason: str
    failure_code: int


def stow(request: Request, *, study_uid: str | None) -> Response:
    """Store each part through the one ingest service; answer per PS3.18 (200, 202 or 409)."""
    if int(request.META.get("CONTENT_LENGTH") or 0) > _max_body_bytes():
        return Response({"detail": "The request body is too large."}, status=413)
    outcomes: list[ingest.IngestOutcome | _OtherFailure] = []
    try:
        parts = cast(Iterable[BodyPart], request.data)  # MultipartRelatedParser's iterator
        for part in parts:
            outcomes.append(_store_part(request, part, study_uid=study_uid))
    except MultipartError as error:
        if not outcomes:
            raise ParseError(str(error)) from None
        reason = f"the rest of the body was unreadable: {error}"
        outcomes.append(_OtherFailure(reason, ingest.CANNOT_UNDERSTAND))
    if not outcomes:
        raise ParseError("The request holds no parts.")
    stored = [o for o in outcomes if isinstance(o, ingest.IngestOutcome) and o.accepted]
    status = 200 if len(stored) == len(outcomes) else 202 if stored else 409
    response = Response(_stow_body(request, outcomes), status=status)
    if warnings := _warnings(outcomes):
        response["Warning"] = ", ".join(warnings[:MAX_WARNING_HEADERS])
    return response


def _store_part(
    request: Request, part: BodyPart, *, study_uid: str | None
) -> ingest.IngestOutcome | _OtherFailure:
    if part.content_type != DICOM:
        reason = f"a part of type {part.content_type} is not stored; send application/dicom"
        return _OtherFailure(reason, ingest.CANNOT_UNDERSTAND)
    return ingest.instance_ingest(
        data=part.data,
        source=IngestSource.STOW_RS,
        address=services.client_address(request._request),
        user=request.user,
        expected_study_uid=study_uid,
    )


def _stow_body(
    request: Request, outcomes: list[ingest.IngestOutcome | _OtherFailure]
) -> dict[str, Any]:
    referenced, failed, other = [], [], []
    for outcome in outcomes:
        if isinstance(outcome, _OtherFailure):
            other.append({"00081197": _element("US", outcome.failure_code)})
        elif outcome.accepted:
            referenced.append(_referenced_instance(request, outcome))
        else:
            failed.append(
                {
                    "00081150": _element("UI", outcome.sop_class_uid),
                    "00081155": _element("UI", outcome.sop_instance_uid),
                    "00081197": _element("US", outcome.failure_code),
                }
            )
    body: dict[str, Any] = {}
    studies = {o.study_instance_uid for o in outcomes if isinstance(o, ingest.IngestOutcome)}
    if referenced and len(studies) == 1:
        body["00081190"] = _element("UR", _url(request, "dicomweb-study", study_uid=studies.pop()))
    if referenced:
        body["00081199"] = _element("SQ", *referenced)
    if failed:
        body["00081198"] = _element("SQ", *failed)
    if other:
        body["0008119A"] = _element("SQ", *other)
    return body


def _referenced_instance(request: Request, outcome: ingest.IngestOutcome) -> dict[str, Any]:
    url = _url(
        request,
        "dicomweb-instance",
        study_uid=outcome.study_instance_uid,
        series_uid=outcome.series_instance_uid,
        sop_uid=outcome.sop_instance_uid,
    )
    return {
        "00081150": _element("UI", outcome.sop_class_uid),
        "00081155": _element("UI", outcome.sop_instance_uid),
        "00081190": _element("UR", url),
    }


def _warnings(outcomes: list[ingest.IngestOutcome | _OtherFailure]) -> list[str]:
    """Why each part was refused, as RFC 7234 warnings (the only text PS3.18 gives room for)."""
    reasons = [o.reason for o in outcomes if isinstance(o, _OtherFailure) or not o.accepted]
    return ['299 ichtriage "{}"'.format(reason.replace('"', "'")) for reason in reasons]


# --- QIDO-RS --------------------------------------------------------------------------------

_TAG = re.compile(r"[0-9A-Fa-f]{8}")
_DATE = re.compile(r"(\d{8})?(-)?(\d{8})?")


# Query parameters that are not matching keys.
_QUERY_CONTROLS = frozenset({"limit", "offset", "includefield", "fuzzymatching"})
MATCHING_KEYS = {
    "studies": frozenset(
        {
            "StudyInstanceUID",
            "PatientID",
            "PatientName",
            "AccessionNumber",
            "StudyDate",
            "ModalitiesInStudy",
            "Modality",
        }
    ),
    "series": frozenset({"Modality", "SeriesInstanceUID", "SeriesNumber"}),
    "instances": frozenset({"SOPInstanceUID", "SOPClassUID", "InstanceNumber"}),
}


def _query(request: Request, level: str) -> dict[str, str]:
    """Query keys by keyword, whether the client sent a keyword or a tag (0020000D).

    A matching key this server does not match on (StudyID, ReferringPhysicianName...) is a 400
    naming it: ignored, it would answer a narrow search with every study, other patients' too.
    A key sent empty asks for nothing to be matched and is ignored."""
    keys: dict[str, str] = {}
    unsupported = []
    for key in request.query_params:
        value = str(request.query_params.get(key) or "")
        keyword = (keyword_for_tag(int(key, 16)) if _TAG.fullmatch(key) else key) or key
        if keyword in _QUERY_CONTROLS or not value or keyword in MATCHING_KEYS[level]:
            keys[keyword] = value
        else:
            unsupported.append(keyword)
    if unsupported:
        supported = ", ".join(sorted(MATCHING_KEYS[level]))
        raise ValidationError(
            {
                "detail": f"this server does not match {level} on {', '.join(sorted(unsupported))}"
                f" (it matches on {supported})"
            }
        )
    return keys


def _paged(request: Request, rows: QuerySet[Any]) -> list[Any]:
    try:
        limit = min(int(request.query_params.get("limit", DEFAULT_LIMIT)), MAX_LIMIT)
        offset = int(request.query_params.get("offset", 0))
    except ValueError:
        raise ValidationError({"detail": "limit and offset are whole numbers."}) from None
    if limit < 0 or offset < 0:
        raise ValidationError({"detail": "limit and offset are not negative."})
    return list(rows[offset : offset + limit])


def _matches(field: str, value: str, *, ignore_case: bool = False) -> Q:
    """DICOM matching: a list of values (backslash or comma), * and ? wildcards, else exact."""
    values = [v for v in re.split(r"[\\,]", value) if v]
    condition = Q()
    for one in values:
        if "*" in one or "?" in one:
            pattern = "^" + re.escape(one).replace(r"\*", ".*").replace(r"\?", ".") + "$"
            condition |= Q(**{f"{field}__{'iregex' if ignore_case else 'regex'}": pattern})
        else:
            condition |= Q(**{f"{field}__{'iexact' if ignore_case else 'exact'}": one})
    return condition


def _date_range(value: str) -> tuple[date | None, date | None]:
    match = _DATE.fullmatch(value.strip())
    if not match or not (match.group(1) or match.group(3)):
        raise ValidationError({"detail": "StudyDate is YYYYMMDD or a range YYYYMMDD-YYYYMMDD."})
    start, dash, end = match.groups()
    try:
        first = date(int(start[:4]), int(start[4:6]), int(start[6:])) if start else None
        last = date(int(end[:4]), int(end[4:6]), int(end[6:])) if end else None
    except ValueError:
        raise ValidationError({"detail": "StudyDate holds an impossible date."}) from None
    return first, (last if dash else first)


_STUDY_FILTERS: dict[str, Callable[[str], Q]] = {
    "StudyInstanceUID": lambda v: _matches("study_instance_uid", v),
    "PatientID": lambda v: _matches("patient_id", v),
    "PatientName": lambda v: _matches("patient_name", v, ignore_case=True),
    "AccessionNumber": lambda v: _matches("accession_number", v),
}


def search_studies(query: dict[str, str]) -> QuerySet[Study]:
    studies = Study.objects.annotate(
        series_count=Count("series", distinct=True),
        instance_count=Count("series__instances"),
        modalities=ArrayAgg("series__modality", distinct=True, default=Value([])),
    ).order_by("-received_at", "-pk")
    for keyword, condition in _STUDY_FILTERS.items():
        if query.get(keyword):
            studies = studies.filter(condition(query[keyword]))
    if query.get("StudyDate"):
        first, last = _date_range(query["StudyDate"])
        if first:  # the header's own date, whatever the site's time zone
            studies = studies.filter(study_date__gte=first)
        if last:
            studies = studies.filter(study_date__lte=last)
    modality = query.get("ModalitiesInStudy") or query.get("Modality")
    if modality:
        with_modality = Series.objects.filter(_matches("modality", modality), study=OuterRef("pk"))
        studies = studies.filter(Exists(with_modality))
    return studies


def study_json(request: Request, study: Any) -> dict[str, Any]:
    modalities = sorted(m for m in study.modalities if m)
    return {  # StudyDate and StudyTime as the header gave them, in the study's own local time
        "00080020": _element(
            "DA", study.study_date.strftime("%Y%m%d") if study.study_date else None
        ),
        "00080030": _element("TM", study.study_time or None),
        "00080050": _element("SH", study.accession_number),
        "00080061": _element("CS", *modalities),
        "00081190": _element(
            "UR", _url(request, "dicomweb-study", study_uid=study.study_instance_uid)
        ),
        "00100010": _person_name(study.patient_name),
        "00100020": _element("LO", study.patient_id),
        "0020000D": _element("UI", study.study_instance_uid),
        "00201206": _element("IS", study.series_count),
        "00201208": _element("IS", study.instance_count),
    }


def search_series(study_uid: str, query: dict[str, str]) -> QuerySet[Series]:
    series = (
        Series.objects.filter(study__study_instance_uid=study_uid)
        .select_related("study")
        .annotate(instance_count=Count("instances"))
        .order_by("series_number", "pk")
    )
    if query.get("Modality"):
        series = series.filter(_matches("modality", query["Modality"]))
    if query.get("SeriesInstanceUID"):
        series = series.filter(_matches("series_instance_uid", query["SeriesInstanceUID"]))
    if query.get("SeriesNumber", "").isdigit():
        series = series.filter(series_number=int(query["SeriesNumber"]))
    return series


def series_json(request: Request, series: Any) -> dict[str, Any]:
    uids = {"study_uid": series.study.study_instance_uid, "series_uid": series.series_instance_uid}
    return {
        "00080060": _element("CS", series.modality),
        "0008103E": _element("LO", series.series_description),
        "00081190": _element("UR", _url(request, "dicomweb-series", **uids)),
        "00180015": _element("CS", series.body_part),
        "0020000D": _element("UI", series.study.study_instance_uid),
        "0020000E": _element("UI", series.series_instance_uid),
        "00200011": _element("IS", series.series_number),
        "00201209": _element("IS", series.instance_count),
    }


def search_instances(study_uid: str, series_uid: str, query: dict[str, str]) -> QuerySet[Instance]:
    instances = Instance.objects.filter(
        series__series_instance_uid=series_uid, series__study__study_instance_uid=study_uid
    ).select_related("series__study")
    if query.get("SOPInstanceUID"):
        instances = instances.filter(_matches("sop_instance_uid", query["SOPInstanceUID"]))
    if query.get("SOPClassUID"):
        instances = instances.filter(_matches("sop_class_uid", query["SOPClassUID"]))
    if query.get("InstanceNumber", "").isdigit():
        instances = instances.filter(instance_number=int(query["InstanceNumber"]))
    return instances


def instance_json(request: Request, instance: Instance) -> dict[str, Any]:
    uids = {
        "study_uid": instance.series.study.study_instance_uid,
        "series_uid": instance.series.series_instance_uid,
        "sop_uid": instance.sop_instance_uid,
    }
    return {
        "00080016": _element("UI", instance.sop_class_uid),
        "00080018": _element("UI", instance.sop_instance_uid),
        "00081190": _element("UR", _url(request, "dicomweb-instance", **uids)),
        "0020000D": _element("UI", uids["study_uid"]),
        "0020000E": _element("UI", uids["series_uid"]),
        "00200013": _element("IS", instance.instance_number),
    }


_QUERY_PARAMETERS = {"limit", "offset", "includefield", "fuzzymatching"}


def _query_key(key: str) -> str:
    """A query key as the audit row keeps it: an attribute (keyword or tag) or a QIDO
    parameter; anything else (a value sent as a bare key, maybe a name) is not kept."""
    from pydicom.datadict import keyword_dict

    name = key.split(".")[0]
    if key in _QUERY_PARAMETERS or name in keyword_dict or re.fullmatch(r"[0-9A-Fa-f]{8}", name):
        return key
    return "(other)"


def _audit(request: Request, action: str, *, study: Study | None = None, **details: Any) -> None:
    services.audit_record(
        action=action,
        user=request.user,
        address=services.client_address(request._request),
        study=study,
        obj=study,
        details=details,
    )


@transaction.atomic
def query(
    request: Request, *, level: str, rows: QuerySet[Any], serialise: Callable[..., dict[str, Any]]
) -> Response:
    page = _paged(request, rows)
    # the studies whose patient data the answer discloses, whatever its level
    disclosed = sorted(
        {
            row.pk
            if isinstance(row, Study)
            else row.study_id
            if isinstance(row, Series)
            else row.series.study_id
            for row in page
        }
    )
    study = Study.objects.get(pk=disclosed[0]) if len(disclosed) == 1 else None
    _audit(
        request,
        AuditAction.DICOMWEB_QUERY,
        study=study,
        level=level,
        keys=sorted(_query_key(k) for k in request.query_params),
        results=len(page),
        study_ids=disclosed,
    )
    return Response([serialise(request, row) for row in page])


# --- WADO-RS --------------------------------------------------------------------------------


def _stored_instances(
    study_uid: str, series_uid: str | None = None, sop_uid: str | None = None
) -> tuple[Study, list[Instance]]:
    study = Study.objects.filter(study_instance_uid=study_uid).first()
    if study is None:
        raise NotFound("No such study.")
    instances = Instance.objects.filter(series__study=study).select_related("series__study")
    if series_uid is not None:
        instances = instances.filter(series__series_instance_uid=series_uid)
    if sop_uid is not None:
        instances = instances.filter(sop_instance_uid=sop_uid)
    found = list(instances.order_by("series__series_number", "series_id", "slice_position"))
    if not found:
        raise NotFound("No such series or instance.")
    return study, found


def _retrieved(
    request: Request, what: str, *, study_uid: str, series_uid: str | None, sop_uid: str | None
) -> list[Instance]:
    """The instances asked for, with the retrieval audited before a byte is sent."""
    with transaction.atomic():
        study, instances = _stored_instances(study_uid, series_uid, sop_uid)
        _audit(
            request,
            AuditAction.DICOMWEB_RETRIEVE,
            study=study,
            what=what,
            series_instance_uid=series_uid or "",
            sop_instance_uid=sop_uid or "",
            instances=len(instances),
        )
    return instances


def retrieve_instances(
    request: Request, *, study_uid: str, series_uid: str | None = None, sop_uid: str | None = None
) -> StreamingHttpResponse:
    instances = _retrieved(
        request, "instances", study_uid=study_uid, series_uid=series_uid, sop_uid=sop_uid
    )
    parts = []
    for instance in instances:
        file_path = instance_file_path(instance)
        syntax = read_file_meta_info(file_path).TransferSyntaxUID
        parts.append((f"{DICOM}; transfer-syntax={syntax}", _file_chunks(file_path)))
    return _multipart_response(parts, part_type=DICOM, request=request)


def retrieve_metadata(
    request: Request, *, study_uid: str, series_uid: str | None = None, sop_uid: str | None = None
) -> HttpResponse:
    instances = _retrieved(
        request, "metadata", study_uid=study_uid, series_uid=series_uid, sop_uid=sop_uid
    )
    headers = [pydicom.dcmread(instance_file_path(i), stop_before_pixels=True) for i in instances]
    body = [header.to_json_dict(suppress_invalid_tags=True) for header in headers]
    return HttpResponse(json.dumps(body), content_type=DICOM_JSON)


def _frame_numbers(frames: str) -> list[int]:
    try:
        numbers = [int(n) for n in frames.split(",")]
    except ValueError:
        raise ValidationError({"detail": "Frames are a comma-separated list of numbers."}) from None
    if not numbers or min(numbers) < 1:
        raise ValidationError({"detail": "Frame numbers start at 1."})
    return numbers


def uncompressed_frame(dataset: pydicom.Dataset, number: int) -> bytes:
    """Frame ``number`` (from 1) as native little-endian pixels, decoded if it was compressed."""
    if not dataset.file_meta.TransferSyntaxUID.is_encapsulated:
        rows, columns = int(dataset.Rows), int(dataset.Columns)
        samples = int(dataset.get("SamplesPerPixel", 1) or 1)
        size = rows * columns * samples * int(dataset.BitsAllocated) // 8
        return bytes(dataset.PixelData[(number - 1) * size : number * size])
    pixels = pydicom.pixels.pixel_array(dataset, index=number - 1, raw=True)
    return bytes(pixels.astype(pixels.dtype.newbyteorder("<")).tobytes())


def retrieve_frames(
    request: Request, *, study_uid: str, series_uid: str, sop_uid: str, frames: str
) -> HttpResponse | StreamingHttpResponse:
    numbers = _frame_numbers(frames)
    (instance,) = _retrieved(
        request, "frames", study_uid=study_uid, series_uid=series_uid, sop_uid=sop_uid
    )
    dataset = pydicom.dcmread(instance_file_path(instance))
    available = int(dataset.get("NumberOfFrames", 1) or 1)
    if "PixelData" not in dataset or max(numbers) > available:
        raise NotFound(f"The instance has {available} frame(s).")
    content = [uncompressed_frame(dataset, number) for number in numbers]
    part_type = f"{OCTET_STREAM}; transfer-syntax={ExplicitVRLittleEndian}"
    accept = request.META.get("HTTP_ACCEPT", "")
    if len(content) == 1 and accept.split(";")[0].strip() == OCTET_STREAM:
        return HttpResponse(content[0], content_type=part_type)
    parts = [(part_type, _constant(frame)) for frame in content]
    return _multipart_response(parts, part_type=OCTET_STREAM, request=request)


def _constant(data: bytes) -> Callable[[], Iterable[bytes]]:
    return lambda: (data,)


# --- Views ----------------------------------------------------------------------------------

_DATA_SETS = {"type": "array", "items": {"type": "object"}}  # DICOM JSON (PS3.18 F.2)


def _query_schema(operation_id: str) -> Any:
    return extend_schema(
        operation_id=operation_id, request=None, responses={(200, DICOM_JSON): _DATA_SETS}
    )


def _retrieve_schema(operation_id: str | None = None) -> Any:
    multipart = {(200, "multipart/related"): bytes}
    return extend_schema(operation_id=operation_id, request=None, responses=multipart)


def _stow_schema(operation_id: str) -> Any:
    return extend_schema(
        operation_id=operation_id,
        request={"multipart/related": bytes},
        responses={(200, DICOM_JSON): dict},
    )


class StudiesView(DicomwebView):
    """QIDO-RS search for studies (GET) and STOW-RS (POST)."""

    parser_classes = [MultipartRelatedParser]

    @_query_schema("dicomweb_search_studies")
    def get(self, request: Request) -> Response:
        rows = search_studies(_query(request, "studies"))
        return query(request, level="studies", rows=rows, serialise=study_json)

    @_stow_schema("dicomweb_store_instances")
    def post(self, request: Request) -> Response:
        return stow(request, study_uid=None)


class StudyView(DicomwebView):
    """WADO-RS: the whole study (GET); STOW-RS of instances of this study only (POST)."""

    parser_classes = [MultipartRelatedParser]

    @_retrieve_schema("dicomweb_retrieve_study")
    def get(self, request: Request, study_uid: str) -> StreamingHttpResponse:
        return retrieve_instances(request, study_uid=study_uid)

    @_stow_schema("dicomweb_store_study_instances")
    def post(self, request: Request, study_uid: str) -> Response:
        return stow(request, study_uid=study_uid)


class SeriesSearchView(DicomwebView):
    @_query_schema("dicomweb_search_series")
    def get(self, request: Request, study_uid: str) -> Response:
        rows = search_series(study_uid, _query(request, "series"))
        return query(request, level="series", rows=rows, serialise=series_json)


class InstanceSearchView(DicomwebView):
    @_query_schema("dicomweb_search_instances")
    def get(self, request: Request, study_uid: str, series_uid: str) -> Response:
        rows = search_instances(study_uid, series_uid, _query(request, "instances"))
        return query(request, level="instances", rows=rows, serialise=instance_json)


class RetrieveView(DicomwebView):
    """WADO-RS of a series or one instance (the URL says which)."""

    @_retrieve_schema()
    def get(self, request: Request, **uids: str) -> StreamingHttpResponse:
        return retrieve_instances(request, **uids)


class MetadataView(DicomwebView):
    @extend_schema(responses={(200, DICOM_JSON): _DATA_SETS}, request=None)
    def get(self, request: Request, **uids: str) -> HttpResponse:
        return retrieve_metadata(request, **uids)


class FramesView(DicomwebView):
    @_retrieve_schema()
    def get(
        self, request: Request, study_uid: str, series_uid: str, sop_uid: str, frames: str
    ) -> HttpResponse | StreamingHttpResponse:
        return retrieve_frames(
            request, study_uid=study_uid, series_uid=series_uid, sop_uid=sop_uid, frames=frames
        )


_STUDY = "studies/<str:study_uid>"
_SERIES = f"{_STUDY}/series/<str:series_uid>"
_INSTANCE = f"{_SERIES}/instances/<str:sop_uid>"

urlpatterns = [
    path("studies", StudiesView.as_view(), name="dicomweb-studies"),
    path(_STUDY, StudyView.as_view(), name="dicomweb-study"),
    path(f"{_STUDY}/metadata", MetadataView.as_view(), name="dicomweb-study-metadata"),
    path(f"{_STUDY}/series", SeriesSearchView.as_view(), name="dicomweb-series-search"),
    path(_SERIES, RetrieveView.as_view(), name="dicomweb-series"),
    path(f"{_SERIES}/metadata", MetadataView.as_view(), name="dicomweb-series-metadata"),
    path(f"{_SERIES}/instances", InstanceSearchView.as_view(), name="dicomweb-instance-search"),
    path(_INSTANCE, RetrieveView.as_view(), name="dicomweb-instance"),
    path(f"{_INSTANCE}/metadata", MetadataView.as_view(), name="dicomweb-instance-metadata"),
    path(f"{_INSTANCE}/frames/<str:frames>", FramesView.as_view(), name="dicomweb-frames"),
]
