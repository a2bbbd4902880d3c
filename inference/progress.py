"""Progress bars that also show in a log file.

On a terminal, a live tqdm bar. Anywhere else (``make demo-model > train.log``, nohup, CI) tqdm
would either stay silent or fill the file with carriage returns; there each bar writes one plain
line, with count, rate and ETA, when it starts, at most every ``interval_s`` seconds after that,
and when it ends.
"""

import sys
from collections.abc import Iterable
from typing import IO, Any

from tqdm import tqdm

LOG_INTERVAL_S = 30.0


class LineBar(tqdm):
    """tqdm that writes whole lines instead of redrawing one, one per count at most."""

    _written = -1

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        text = (self.__str__() if msg is None else msg).strip()
        if text and self.n != self._written:
            self._written = self.n
            self.fp.write(text + "\n")
            self.fp.flush()
        return True


class _Lines:
    """The stream a LineBar writes to: drops tqdm's own bare newlines and carriage returns
    (a closed bar ends with one), passes whole lines on."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def write(self, text: str) -> None:
        if text.strip("\r\n"):
            self._stream.write(text)

    def flush(self) -> None:
        self._stream.flush()


def progress(
    iterable: Iterable[Any] | None = None,
    *,
    desc: str,
    unit: str,
    total: int | None = None,
    enabled: bool = True,
    interval_s: float = LOG_INTERVAL_S,
    file: IO[str] | None = None,
) -> tqdm:
    """A tqdm bar over ``iterable`` (or updated by hand when it is None): live on a terminal,
    one line per ``interval_s`` elsewhere, nothing when not ``enabled``."""
    stream = file or sys.stderr
    if not enabled:
        return tqdm(iterable, total=total, disable=True)
    if stream.isatty():
        return tqdm(iterable, desc=desc, unit=unit, total=total, file=stream)
    return LineBar(
        iterable,
        desc=desc,
        unit=unit,
        total=total,
        file=_Lines(stream),
        mininterval=interval_s,
        maxinterval=interval_s,  # tqdm's monitor thread otherwise forces a line every 10 s
        bar_format="{desc}: {n_fmt}/{total_fmt} {unit} [{elapsed} elapsed, {remaining} left, "
        "{rate_fmt}{postfix}]",
    )
