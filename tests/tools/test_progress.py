"""Progress bars: redrawn in place on a terminal, whole lines in a log."""
import io

from tokenmerge.tools import progress
from tokenmerge.tools.progress import ProgressBar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def log_of(monkeypatch, seconds_between_updates: float, updates: int = 9) -> str:
    """What a bar of ``updates`` steps writes into a log file, on a clock that moves
    ``seconds_between_updates`` before every update."""
    now = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    log = io.StringIO()
    with ProgressBar(total=updates, desc="work", file=log, mininterval=0) as bar:
        for _ in range(updates):
            now[0] += seconds_between_updates
            bar.update()
    return log.getvalue()


def test_a_log_gets_whole_lines_at_the_start_every_interval_and_the_end(monkeypatch):
    text = log_of(monkeypatch, 10)
    assert "\r" not in text
    lines = text.splitlines()
    assert lines[0].startswith("work:   0%") and lines[-1].startswith("work: 100%")
    assert len(lines) == 4  # the start, 30 s, 60 s and 90 s (the end, not again): one line per 30 s, not per update


def test_a_log_gets_the_end_once_more_only_where_it_moved_since_the_last_line(monkeypatch):
    lines = log_of(monkeypatch, 1).splitlines()
    assert [line.split("|")[0] for line in lines] == ["work:   0%", "work: 100%"]


def test_a_terminal_gets_tqdm_redraws():
    screen = Terminal()
    with ProgressBar(total=3, desc="work", file=screen, mininterval=0) as bar:
        for _ in range(3):
            bar.update()
    assert "\r" in screen.getvalue()
