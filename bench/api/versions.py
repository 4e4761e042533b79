"""The version of a plugin's code, part of every cache and resume key of what it produces.

A method or task may set ``version`` explicitly; by default it is derived
from the source files of its class and of its bases outside svdbench's host
(``bench``), so editing a plugin file - a built-in or one in
``--plugins-dir`` - recomputes what that plugin produced and nothing else.
Code a plugin calls in *other* modules is not covered: set ``version`` (and
bump it) when results depend on it.
"""

from __future__ import annotations

import hashlib
import inspect
import os

_digests: dict[tuple[str, int, int], str] = {}


def _file_digest(path: str) -> str:
    stat = os.stat(path)
    key = (path, stat.st_mtime_ns, stat.st_size)
    if key not in _digests:
        with open(path, "rb") as handle:
            _digests[key] = hashlib.sha256(handle.read()).hexdigest()
    return _digests[key]


def source_version(cls: type) -> str:
    """16 hex digits of sha256 over the source files of ``cls`` and its bases outside ``bench`` and builtins."""
    digest = hashlib.sha256()
    for klass in cls.__mro__:
        root = klass.__module__.split(".")[0]
        if root in ("builtins", "bench", "abc", "typing"):
            continue
        try:
            path = inspect.getsourcefile(klass)
        except (TypeError, OSError):
            path = None
        digest.update((_file_digest(path) if path and os.path.exists(path) else
                       f"{klass.__module__}.{klass.__qualname__}").encode())
    return digest.hexdigest()[:16]


def code_version(obj) -> str:
    """``obj``'s explicit ``version``, else its :func:`source_version`."""
    explicit = getattr(obj, "version", None)
    return str(explicit) if explicit is not None else source_version(type(obj))
