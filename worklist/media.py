"""Where instance files live: under the media root, never outside it."""

from pathlib import Path
from typing import BinaryIO

from django.conf import settings

from worklist.models import Instance


def instance_file_path(instance: Instance) -> Path:
    root = Path(settings.MEDIA_ROOT).resolve()
    path = (root / instance.path).resolve()
    if not path.is_relative_to(root):
        raise ValueError(f"Instance {instance.pk} points outside the media root.")
    return path


def open_instance_file(instance: Instance) -> BinaryIO:
    return instance_file_path(instance).open("rb")
