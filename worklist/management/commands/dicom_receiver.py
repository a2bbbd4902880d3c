"""Runs the DICOM C-STORE / C-ECHO receiver until interrupted (started by `make run`)."""

import logging
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from pynetdicom import _config as pynetdicom_config

from worklist.receiver import start_receiver


class Command(BaseCommand):
    help = (
        "Receive DICOM images by C-STORE (and answer C-ECHO) on ICH_DICOM_HOST:ICH_DICOM_PORT "
        "as ICH_DICOM_AE_TITLE; only ICH_DICOM_ALLOWED_AETS may send when it is set."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--host", default=settings.ICH_DICOM_HOST)
        parser.add_argument("--port", type=int, default=settings.ICH_DICOM_PORT)
        parser.add_argument("--ae-title", default=settings.ICH_DICOM_AE_TITLE)

    def handle(self, *args: Any, host: str, port: int, ae_title: str, **options: Any) -> None:
        # pynetdicom's own debug output dumps data sets (patient data): keep it quiet, and log
        # associations through worklist.receiver, which names AE titles and counts only.
        pynetdicom_config.LOG_HANDLER_LEVEL = "none"
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
        allowed = list(settings.ICH_DICOM_ALLOWED_AETS)
        self.stdout.write(
            f"DICOM receiver {ae_title!r} listening on {host}:{port}; "
            f"calling AE titles: {', '.join(allowed) if allowed else 'any'}",
        )
        try:
            start_receiver(
                host=host, port=port, ae_title=ae_title, allowed_calling_aets=allowed, block=True
            )
        except OSError as error:
            raise CommandError(f"Cannot listen on {host}:{port}: {error}") from None
        except KeyboardInterrupt:
            self.stdout.write("DICOM receiver stopped.")
