"""Path names the file system cannot hold, refused before anything is written.

Linux (and most file systems) limit one path component to 255 bytes and a
whole path to 4096; a longer ``--out`` otherwise ends in ``OSError: [Errno 36]
File name too long`` from deep inside the first ``stat``.
"""

from __future__ import annotations

import os
from pathlib import Path

from bench.errors import UsageError

NAME_MAX = 255  # bytes of one path component
PATH_MAX = 4096  # bytes of a whole path


def check_path_name(path: str | os.PathLike, flag: str) -> None:
    """Refuse ``path`` (given as ``flag``) when a component or the whole path is too long for the file system."""
    encoded = os.fsencode(os.fspath(path))
    for part in Path(os.fspath(path)).parts:
        size = len(os.fsencode(part))
        if size > NAME_MAX:
            raise UsageError(f"{flag} has a name of {size} bytes ({part[:24]}...); the file system allows at most "
                             f"{NAME_MAX} bytes per name: shorten it")
    if len(encoded) > PATH_MAX:
        raise UsageError(f"{flag} is {len(encoded)} bytes long; the file system allows at most {PATH_MAX} bytes "
                         "per path: shorten it")
