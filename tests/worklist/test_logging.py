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
