"""The svdbench plugin API: every hook a plugin may implement.

A plugin is any module or object with functions marked ``@hookimpl``. Plugins
never touch a registry directly: each hook receives a ``register`` callback and
calls it once per thing it provides. Built-in methods, tasks and statistics are
plugins declared through the ``svdbench`` entry-point group, exactly like a
third-party package would declare its own.

Example (a complete method plugin)::

    from bench import hookimpl, Method

    class MyMethod(Method):
        name = "mine"
        ...

    @hookimpl
    def register_methods(register):
        register(MyMethod())
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:  # imported for annotations only, to keep plugin import cheap
    from pathlib import Path

    from bench.api.method import Method
    from bench.api.statistic import Statistic
    from bench.api.task import Task
    from bench.model.layouts import QuantizedLayout

PROJECT = "svdbench"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_methods(register: Callable[[Method], None]) -> None:
    """Register compression methods.

    :param register: call ``register(method)`` with a :class:`bench.Method`
        instance for every method the plugin provides. Method names are global:
        registering a name twice raises :class:`bench.UsageError`.
    :returns: nothing; the return value is ignored.
    """


@hookspec
def register_tasks(register: Callable[[Task], None]) -> None:
    """Register evaluation tasks (perplexity sets, zero-shot suites, speed).

    :param register: call ``register(task)`` with a :class:`bench.Task`
        instance for every task the plugin provides. Names are global.
    :returns: nothing; the return value is ignored.
    """


@hookspec
def register_statistics(register: Callable[[Statistic], None]) -> None:
    """Register calibration statistics that methods can ask for by name.

    A statistic (for example ``gram`` = X X^T per compressed linear) is
    collected once per (model, calibration settings) and shared by every
    method that lists its name in :attr:`bench.Method.requires`.

    :param register: call ``register(statistic)`` with a
        :class:`bench.Statistic` instance. Names are global.
    :returns: nothing; the return value is ignored.
    """


@hookspec
def register_layouts(register: Callable[[QuantizedLayout], None]) -> None:
    """Register how a plugin's quantized linear is saved and rebuilt, so ``svdbench compress`` saves it and
    svdbench, plain transformers and lm-eval load it back.

    :param register: call ``register(layout)`` with a :class:`bench.QuantizedLayout`
        for every kind of quantized module the plugin's methods produce.
        Quantizer names are global.
    :returns: nothing; the return value is ignored.
    """


@hookspec
def register_commands(register: Callable[[Command], None]) -> None:
    """Register ``svdbench`` subcommands (reports, comparisons, regression checks).

    :param register: call ``register(command)`` with a :class:`Command` for
        every subcommand the plugin provides. Names are global.
    :returns: nothing; the return value is ignored.
    """


@hookspec
def write_report(results: dict, out_dir: Path, with_published: bool) -> list[Path]:
    """Render a finished run's ``results.json`` (already loaded) into ``out_dir``.

    Called by ``svdbench run`` and ``svdbench report``; every implementation
    runs. The first path returned by any plugin is printed as the report.

    :param results: the results.json dictionary (manifest, records, ...).
    :param out_dir: the run's output directory.
    :param with_published: whether to print the papers' numbers beside the measured tables.
    :returns: the paths written.
    """


class Command:
    """An ``svdbench`` subcommand contributed by a plugin.

    ``configure`` adds the command's arguments to its argparse parser; ``run``
    executes it and returns the exit status. ``invoke(argv)`` runs another
    svdbench command line in the same process (a baseline command runs a
    profile first) and returns its exit status.
    """

    name: str = ""
    help: str = ""

    def configure(self, parser) -> None:
        pass

    def run(self, args, invoke: Callable[[list[str]], int]) -> int:
        raise NotImplementedError
