"""Progress bars: redrawn in place on a terminal, whole lines in a log."""
import io

from tokenmerge.tools import progress
from tokenmerge.tools.progress import ProgressBar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_whole_lines_at_the_start_every_interval_and_the_end(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    log = io.StringIO()
    with ProgressBar(total=9, desc="work", file=log, mininterval=0) as bar:
        for _ in range(9):
            now[0] += 10  # every update 10 s after the last
            bar.update()
            bar.refresh()
    text = log.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert lines[0].startswith("work:   0%") and lines[-1].startswith("work: 100%")
    assert len(lines) == 4  # the start, 30 s, 60 s and 90 s (the end, not again): one line per 30 s, not per update


def test_a_log_gets_the_end_once_more_only_where_it_moved_since_the_last_line(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    log = io.StringIO()
    with ProgressBar(total=9, desc="work", file=log, mininterval=0) as bar:
        for _ in range(9):
            now[0] += 1
            bar.update()
    lines = log.getvalue().splitlines()
    assert [line.split("|")[0] for line in lines] == ["work:   0%", "work: 100%"]


def test_a_terminal_gets_tqdm_redraws():
    screen = Terminal()
    with ProgressBar(total=3, desc="work", file=screen, mininterval=0) as bar:
        for _ in range(3):
            bar.update()
    assert "\r" in screen.getvalue()
