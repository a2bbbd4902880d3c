"""Progress bars in logs: whole lines, throttled, silent when disabled, live on a terminal."""

import io

from inference.progress import progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_whole_lines_with_count_and_eta() -> None:
    log = io.StringIO()
    for _ in progress(range(4), desc="evaluate phantom", unit="item", file=log, interval_s=0):
        pass
    text = log.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert [line.split(" [")[0] for line in lines] == [
        f"evaluate phantom: {n}/4 item" for n in range(5)
    ]
    assert all(" left, " in line for line in lines)
    assert text.endswith("\n") and not text.endswith("\n\n")


def test_a_log_gets_a_line_per_interval_only() -> None:
    log = io.StringIO()
    bar = progress(desc="prepare phantom", unit="study", total=500, file=log, interval_s=3600)
    for _ in range(500):
        bar.update(1)
    bar.set_postfix(loss="0.123")
    bar.close()
    lines = log.getvalue().splitlines()
    assert len(lines) == 2  # started, finished
    assert lines[0].startswith("prepare phantom: 0/500 study")
    assert lines[1].startswith("prepare phantom: 500/500 study")


def test_disabled_writes_nothing_and_a_terminal_gets_a_live_bar() -> None:
    log = io.StringIO()
    for _ in progress(range(3), desc="x", unit="item", file=log, enabled=False):
        pass
    assert log.getvalue() == ""
    terminal = Terminal()
    for _ in progress(range(3), desc="x", unit="item", file=terminal):
        pass
    assert "\r" in terminal.getvalue()
