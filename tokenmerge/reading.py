"""The files a user names (a schedule file, a class map, weights), checked and read
the same way everywhere: every problem with one is a one-line ``ValueError`` naming
the file, what is wrong with it and what to do, never a traceback, and never a read
that blocks on a FIFO or fills memory from a device."""
from __future__ import annotations

import stat
from pathlib import Path

#: The most a text file a user names is read of: far more than any schedule, class map
#: or checkpoint state holds, and little enough to read at once.
MAX_TEXT_BYTES = 16 * 2**20


class MissingFile(FileNotFoundError, ValueError):
    """A file the user named does not exist: a ``ValueError`` like every other problem
    with such a file, and a ``FileNotFoundError``, as it is."""


def check_file(path: str | Path, kind: str, remedy: str) -> Path:
    """``path``, if it names a regular file (links followed) that can be opened for
    reading; otherwise a ``ValueError`` "KIND PATH is ...; REMEDY" saying which: it does
    not exist, is a folder, is no regular file (a device, FIFO or socket, whose reading
    may never end), or cannot be read. Permission bits are not trusted: the file is
    opened, since they do not stop root and say nothing of files such as /proc's."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
        if stat.S_ISREG(mode):
            with open(path, "rb"):
                pass
    except FileNotFoundError:
        raise MissingFile(f"{kind} {path} does not exist; {remedy}") from None
    except OSError as error:
        raise _unreadable(path, kind, remedy, error) from None
    if stat.S_ISDIR(mode):
        raise ValueError(f"{kind} {path} is a folder; {remedy}")
    if not stat.S_ISREG(mode):
        raise ValueError(f"{kind} {path} is not a regular file (it is a device, FIFO or socket); {remedy}")
    return path


def read_text(path: str | Path, kind: str, remedy: str, limit: int = MAX_TEXT_BYTES) -> str:
    """The UTF-8 text of the file ``path`` (checked by :func:`check_file`), of at most
    ``limit`` bytes; a one-line ``ValueError`` naming it, as :func:`check_file` words
    it, for a file that cannot be read, is larger or is not UTF-8 text."""
    path = check_file(path, kind, remedy)
    try:
        with open(path, "rb") as handle:
            data = handle.read(limit + 1)
    except OSError as error:
        raise _unreadable(path, kind, remedy, error) from None
    if len(data) > limit:
        raise ValueError(f"{kind} {path} is larger than {limit / 2**20:g} MB, far more than a {kind} holds; {remedy}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{kind} {path} is not UTF-8 text ({error.reason} at byte {error.start}); {remedy}") from None


def _unreadable(path: Path, kind: str, remedy: str, error: OSError) -> ValueError:
    return ValueError(f"{kind} {path} cannot be read ({error.strerror or error}); {remedy}")
