"""Where instance files live: under the media root, never outside it."""

from pathlib import Path
from typing import BinaryIO

from django.conf import settings

from worklist.models import Instance


def media_path(relative: str) -> Path:
    """An absolute path under the media root; anything pointing outside it is refused."""
    root = Path(settings.MEDIA_ROOT).resolve()
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        raise ValueError("a stored path points outside the media root")
    return path


def instance_file_path(instance: Instance) -> Path:
    return media_path(instance.path)


def open_instance_file(instance: Instance) -> BinaryIO:
    return instance_file_path(instance).open("rb")
