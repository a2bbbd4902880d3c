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
