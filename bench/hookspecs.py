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

from typing import TYPE_CHECKING, Callable

import pluggy

if TYPE_CHECKING:  # imported for annotations only, to keep plugin import cheap
    from bench.calibration import Statistic
    from bench.method import Method
    from bench.task import Task

PROJECT = "svdbench"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_methods(register: Callable[["Method"], None]) -> None:
    """Register compression methods.

    :param register: call ``register(method)`` with a :class:`bench.method.Method`
        instance for every method the plugin provides. Method names are global:
        registering a name twice raises :class:`bench.errors.UsageError`.
    :returns: nothing; the return value is ignored.
    """


@hookspec
def register_tasks(register: Callable[["Task"], None]) -> None:
    """Register evaluation tasks (perplexity sets, zero-shot suites, speed).

    :param register: call ``register(task)`` with a :class:`bench.task.Task`
        instance for every task the plugin provides. Names are global.
    :returns: nothing; the return value is ignored.
    """


@hookspec
def register_statistics(register: Callable[["Statistic"], None]) -> None:
    """Register calibration statistics that methods can ask for by name.

    A statistic (for example ``gram`` = X X^T per compressed linear) is
    collected once per (model, calibration settings) and shared by every
    method that lists its name in :attr:`bench.method.Method.requires`.

    :param register: call ``register(statistic)`` with a
        :class:`bench.calibration.Statistic` instance. Names are global.
    :returns: nothing; the return value is ignored.
    """
