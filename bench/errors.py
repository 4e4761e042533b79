"""Errors svdbench reports to users.

``UsageError`` is bad input: the CLI prints its message on one line and exits
with status 2. Its message must name what was wrong and what would be right.
"""

from __future__ import annotations

import difflib


class UsageError(Exception):
    """Bad input from the user or a plugin; the message says how to fix it."""


def unknown_name(kind: str, name: str, known: list[str] | tuple[str, ...]) -> UsageError:
    """An error for an unknown name that suggests the closest known one."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    hint = f"did you mean '{close[0]}'?" if close else f"known: {', '.join(sorted(known)) or 'none'}"
    return UsageError(f"unknown {kind} '{name}'; {hint}")


class NonFinite(FloatingPointError):
    """NaN or inf where a number must be finite: ``layer`` and ``stage`` say where (recorded in ``failures``)."""

    def __init__(self, layer: str | None, stage: str, what: str):
        super().__init__(f"non-finite {what}" + (f" in {layer}" if layer else ""))
        self.layer, self.stage = layer, stage
