"""Browser upload: DICOM files, or .zip archives of them, through the one ingest service.

``POST /api/uploads/`` (multipart form, field ``files``, radiologist role). Each file and each
archive member is ingested on its own, so a bad one never stops the rest; the answer lists what
happened to each. HTTP 200 when at least one was accepted (stored or already there), 422 when
none was. The request body is limited to ICH_UPLOAD_MAX_MB, and so is the unpacked size of the
archives in it (a small zip can unpack to a great deal).
"""

import lzma
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import PurePosixPath
from typing import Any

from django.conf import settings
from django.core.files.uploadedfile import UploadedFile
from drf_spectacular.utils import extend_schema
from rest_framework.exceptions import ValidationError
from rest_framework.parsers import MultiPartParser
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from worklist import ingest, services
from worklist.models import IngestSource
from worklist.roles import IsRadiologist

MAX_ARCHIVE_MEMBERS = 20_000
ZIP_MAGIC = b"PK\x03\x04"


@dataclass(frozen=True)
class UploadResult:
    name: str
    status: str  # stored, duplicate, quarantined, or refused (not readable as a file at all)
    reason: str = ""
    study_id: int | None = None
    series_id: int | None = None
    instance_id: int | None = None
    sop_instance_uid: str = ""

    @property
    def accepted(self) -> bool:
        return self.status in (ingest.IngestStatus.STORED, ingest.IngestStatus.DUPLICATE)


def _max_bytes() -> int:
    return int(settings.ICH_UPLOAD_MAX_MB) * 1024 * 1024


def upload_ingest(
    *, files: list[UploadedFile], user: Any, address: str | None
) -> list[UploadResult]:
    """Every file and archive member through ``instance_ingest``, in the order given."""
    return _Upload(user=user, address=address).ingest(files)


class _Upload:
    """One request's files: what was done with each, and how much may still be unpacked."""

    def __init__(self, *, user: Any, address: str | None) -> None:
        self.user, self.address = user, address
        self.unpack_budget = _max_bytes()
        self.results: list[UploadResult] = []

    def ingest(self, files: list[UploadedFile]) -> list[UploadResult]:
        for upload in files:
            for name, data in self._contents(upload, name=upload.name or "file"):
                outcome = ingest.instance_ingest(
                    data=data, source=IngestSource.UPLOAD, address=self.address, user=self.user
                )
                self.results.append(_result(name, outcome))
        return self.results

    def _refuse(self, name: str, reason: str) -> None:
        self.results.append(UploadResult(name, "refused", reason))

    def _contents(self, upload: UploadedFile, *, name: str) -> Iterator[tuple[str, bytes]]:
        head = upload.read(132)
        upload.seek(0)
        if not _is_zip(name, head):
            yield name, upload.read()
            return
        try:
            archive = zipfile.ZipFile(upload)
        except zipfile.BadZipFile:
            self._quarantine_archive(upload, name=name)
            return
        with archive:
            yield from self._members(archive, name=name)

    def _members(self, archive: zipfile.ZipFile, *, name: str) -> Iterator[tuple[str, bytes]]:
        members = [info for info in archive.infolist() if _is_content(info)]
        if len(members) > MAX_ARCHIVE_MEMBERS:
            self._refuse(
                name, f"{len(members)} files in the archive, more than {MAX_ARCHIVE_MEMBERS}"
            )
            return
        for info in members:
            member_name = f"{name}/{info.filename}"
            self.unpack_budget -= info.file_size
            if self.unpack_budget < 0:
                self._refuse(member_name, "the archives unpack to more than ICH_UPLOAD_MAX_MB")
                return
            try:
                with archive.open(info) as stream:
                    data = stream.read(info.file_size + 1)  # never more than the header promised
            except (
                zipfile.BadZipFile,
                RuntimeError,
                OSError,
                EOFError,
                ValueError,
                NotImplementedError,  # a compression method this Python cannot read
                zlib.error,  # a corrupt deflate stream
                lzma.LZMAError,
            ) as error:
                self._refuse(member_name, f"unreadable archive member ({error})")
                continue
            if len(data) > info.file_size:
                self._refuse(member_name, "the archive member is larger than its header says")
                continue
            yield member_name, data

    def _quarantine_archive(self, upload: UploadedFile, *, name: str) -> None:
        upload.seek(0)
        reason = "not a readable .zip archive"
        ingest.quarantine_record(
            data=upload.read(),
            reason=reason,
            source=IngestSource.UPLOAD,
            address=self.address,
            user=self.user,
        )
        self.results.append(UploadResult(name, ingest.IngestStatus.QUARANTINED, reason))


def _is_zip(name: str, head: bytes) -> bool:
    # A DICOM preamble may hold anything, even "PK": the DICM prefix settles it.
    return name.lower().endswith(".zip") or (head[:4] == ZIP_MAGIC and head[128:132] != b"DICM")


def _is_content(info: zipfile.ZipInfo) -> bool:
    """Files, not folders, DICOMDIR indexes or the hidden files desktop archivers add."""
    parts = PurePosixPath(info.filename).parts
    hidden = any(part.startswith(".") or part == "__MACOSX" for part in parts)
    return not info.is_dir() and not hidden and parts[-1].upper() != "DICOMDIR"


def _result(name: str, outcome: ingest.IngestOutcome) -> UploadResult:
    return UploadResult(
        name=name,
        status=outcome.status.value,
        reason=outcome.reason,
        study_id=outcome.study_id,
        series_id=outcome.series_id,
        instance_id=outcome.instance_id,
        sop_instance_uid=outcome.sop_instance_uid,
    )


class UploadView(APIView):
    """Upload DICOM files or .zip archives of them (form field ``files``, one or more)."""

    permission_classes = [IsRadiologist]
    parser_classes = [MultiPartParser]

    @extend_schema(
        request={"multipart/form-data": {"type": "object", "properties": {"files": {}}}},
        responses={200: dict, 422: dict},
    )
    def post(self, request: Request) -> Response:
        if int(request.META.get("CONTENT_LENGTH") or 0) > _max_bytes():
            return Response({"detail": "The upload is larger than the server accepts."}, 413)
        files = request.FILES.getlist("files") if request.FILES else []
        if not files:
            raise ValidationError({"files": "Send one or more DICOM files or .zip archives."})
        results = upload_ingest(
            files=files, user=request.user, address=services.client_address(request._request)
        )
        accepted = sum(result.accepted for result in results)
        body = {
            "accepted": accepted,
            "refused": len(results) - accepted,
            "results": [asdict(result) for result in results],
        }
        return Response(body, status=200 if accepted else 422)
