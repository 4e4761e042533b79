"""The command line: ``svdbench run``, ``compress``, ``report``, ``plugins`` and the plugins' commands."""

from bench.cli.main import main

__all__ = ["main"]
