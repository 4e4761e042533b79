"""transformers' model code imported with its optional quantizers' import noise kept off stderr.

``transformers.modeling_utils`` imports torchao whenever it is installed (the
``gptq`` extra pulls it in), and torchao logs warnings on import (libraries
built for another Python, no Triton) while torch logs deprecation warnings
about its enums: the first lines of stderr of every run, though no quantizer
runs. The import is done once here with Python warnings, stderr and the log
records of torch, torchao and gptqmodel held back; what was held back is
logged at debug level (``-v`` shows it). A failing import still raises.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import warnings

log = logging.getLogger(__name__)

NOISY = "transformers.modeling_utils"


class _Held(logging.Handler):
    """Collects the records held back during the import."""

    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.name}: {record.getMessage()}")


def import_transformers_quietly() -> None:
    """Import transformers' model code (once per process) without its quantizers' warnings on stderr."""
    if NOISY in sys.modules:
        return
    held, printed = _Held(), io.StringIO()
    loggers = [logging.getLogger(name) for name in ("torchao", "torch", "gptqmodel")]
    saved = [(lg, lg.handlers[:], lg.propagate) for lg in loggers]
    try:
        for lg in loggers:  # their records go to the holder only, whatever handlers they had
            lg.handlers, lg.propagate = [held], False
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stderr(printed):
            warnings.simplefilter("always")
            import transformers.modeling_utils  # noqa: F401
            held.lines += [f"warning: {w.message}" for w in caught]
    finally:
        for lg, handlers, propagate in saved:
            lg.handlers, lg.propagate = handlers, propagate
        held.lines += printed.getvalue().splitlines()
        if held.lines:
            log.debug("held back while importing %s: %s", NOISY, " | ".join(held.lines))
