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
