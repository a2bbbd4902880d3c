"""Logs never carry patient data, library warnings included."""

import logging
import warnings

import pytest


def test_a_library_warning_reaches_the_log_without_its_text(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """highdicom warns 'The string "DOE JANE" is unlikely to represent the intended person
    name' when it copies a patient name into a report: the log keeps the warning's category
    and place, never the name."""
    caplog.set_level(logging.WARNING)
    logging.captureWarnings(True)  # what Django's logging set-up does in every process
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn(
                'The string "DOE JANE" is unlikely to represent the intended person name',
                UserWarning,
                stacklevel=1,
            )
    finally:
        logging.captureWarnings(False)
    (record,) = [r for r in caplog.records if r.name == "py.warnings"]
    assert "DOE JANE" not in caplog.text
    assert record.getMessage().startswith("UserWarning at ")
    assert "test_logging.py:" in record.getMessage()
    assert record.getMessage().endswith("(text withheld: it may quote patient data)")


def test_a_warning_filtered_twice_keeps_its_category_and_place() -> None:
    """Logging configured a second time (a test or a command doing it again) puts the filter
    on the logger twice: the second pass leaves the first one's text as it is."""
    from ichweb.logfilters import WithholdWarningText

    record = logging.LogRecord(
        "py.warnings", logging.WARNING, __file__, 1, "%s",
        ("/x/highdicom/base.py:199: UserWarning: The string \"DOE JANE\" is odd\n  code\n",),
        None,
    )  # fmt: skip
    for _ in range(2):
        assert WithholdWarningText().filter(record)
    assert record.getMessage() == (
        "UserWarning at /x/highdicom/base.py:199 (text withheld: it may quote patient data)"
    )


def _through_the_console_handler(record: logging.LogRecord) -> str:
    """What the app's console handler (settings.LOGGING) prints for ``record``."""
    import io
    import logging.config

    from django.conf import settings

    probe = {"handlers": ["console"], "propagate": False}
    logging.config.dictConfig({**settings.LOGGING, "loggers": {"test.console.probe": probe}})
    (handler,) = logging.getLogger("test.console.probe").handlers
    assert isinstance(handler, logging.StreamHandler)
    stream = io.StringIO()
    handler.setStream(stream)
    handler.handle(record)
    logging.config.dictConfig(settings.LOGGING)  # as it was
    return stream.getvalue()


def test_a_dicom_librarys_record_keeps_its_place_not_its_text() -> None:
    record = logging.LogRecord(
        "pydicom", logging.WARNING, "/x/pydicom/valuerep.py", 1, "Invalid value for VR DA: %r",
        ("19700101x",), None,
    )  # fmt: skip
    printed = _through_the_console_handler(record)
    assert "19700101x" not in printed
    assert "pydicom: warning at valuerep.py:1 (text withheld" in printed


def test_a_logged_exception_keeps_its_type_and_traceback_not_its_message() -> None:
    import sys

    name, problem = "DOE^JANE", "Unable to convert '19700101x' to 'DA' object"
    try:
        try:
            raise KeyError(name)  # the traceback shows these source lines, not the values
        except KeyError as error:
            raise ValueError(problem) from error
    except ValueError:
        exc_info = sys.exc_info()
    record = logging.LogRecord(
        "worklist.tasks", logging.ERROR, __file__, 1, "scoring study %s failed", (7,), exc_info
    )
    printed = _through_the_console_handler(record)
    assert "scoring study 7 failed" in printed
    assert "DOE^JANE" not in printed and "19700101x" not in printed
    assert "KeyError: (text withheld" in printed and "ValueError: (text withheld" in printed
    assert "test_a_logged_exception_keeps_its_type_and_traceback_not_its_message" in printed


def test_a_failed_celery_task_is_logged_with_the_exceptions_type_only() -> None:
    record = logging.LogRecord(
        "celery.app.trace", logging.ERROR, __file__, 1,
        "Task %(name)s[%(id)s] raised unexpected: %(exc)s", None, None,
    )  # fmt: skip
    exc = "ValueError(\"Unable to convert '1970-01-01' to 'DA' object\")"
    record.args = {"name": "worklist.tasks.export_results", "id": "abc", "exc": exc}
    printed = _through_the_console_handler(record)
    assert "1970-01-01" not in printed
    assert "raised unexpected: ValueError (text withheld" in printed
