"""Logging filters that keep patient data out of the logs."""

import logging
import re

# What logging.captureWarnings writes: "path:line: Category: message\n  source line".
_WARNING = re.compile(r"^(?P<where>\S.*?:\d+): (?P<category>[A-Za-z_][\w.]*):")


class WithholdWarningText(logging.Filter):
    """Library warnings captured into logging (logger ``py.warnings``) quote the values they
    warn about: highdicom quotes a patient name it finds odd, pydicom an invalid date. In a
    DICOM app such a value can be patient data, so a warning keeps its category and where it
    was raised, and its text is withheld."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "text_withheld", False):  # logging configured twice: filtered twice
            return True
        match = _WARNING.match(record.getMessage())
        where = f"{match['category']} at {match['where']}" if match else "a warning"
        record.msg = f"{where} (text withheld: it may quote patient data)"
        record.args = ()
        record.text_withheld = True
        return True


WITHHELD = "(text withheld: it may quote patient data)"
# Libraries that read and write DICOM log the values they find odd: an invalid birth date, a
# patient name. Their records keep their level, logger and place; their text is withheld.
DICOM_LIBRARIES = ("pydicom", "highdicom", "pynetdicom")


class WithholdPatientData(logging.Filter):
    """On the handlers, so that it sees every record whichever logger made it:

    - records of the DICOM libraries keep their logger and place, not their text;
    - a logged exception keeps its type and traceback, not its message (pydicom's "Unable to
      convert '19700101x' to 'DA'" quotes the birth date it could not read), and so does the
      exception Celery names when a task fails."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "patient_data_withheld", False):
            return True
        record.patient_data_withheld = True
        if record.name.split(".")[0] in DICOM_LIBRARIES:
            where = f"{record.pathname.rsplit('/', 1)[-1]}:{record.lineno}"
            record.msg, record.args = f"{record.levelname.lower()} at {where} {WITHHELD}", ()
        if record.name == "celery.app.trace" and isinstance(record.args, dict):
            exc = record.args.get("exc")
            if isinstance(exc, str):  # safe_repr(exc): "ValueError('...')" -> "ValueError"
                record.args = {**record.args, "exc": f"{exc.split('(', 1)[0]} {WITHHELD}"}
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = _traceback_without_messages(record.exc_info[1])
        return True


def _traceback_without_messages(error: BaseException) -> str:
    """The traceback as logging prints it, each exception in the chain reduced to its type."""
    import traceback

    report = traceback.TracebackException.from_exception(error)
    seen: set[int] = set()
    stack = [report]
    while stack:
        part = stack.pop()
        if id(part) in seen:
            continue
        seen.add(id(part))
        part._str = WITHHELD  # type: ignore[attr-defined]  # the message line's text
        stack += [p for p in (part.__cause__, part.__context__) if p is not None]
        stack += list(getattr(part, "exceptions", None) or [])
    return "".join(report.format()).rstrip("\n")
