"""The plugin API: everything a method, task, statistic or report plugin imports.

Plugins import it through the package itself (``from bench import Method``);
these modules are where each piece is defined and documented.
"""
