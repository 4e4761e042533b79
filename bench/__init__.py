"""svdbench: a harness that compares SVD compression methods for LLMs.

Plugin authors need only what this module exports::

    from bench import hookimpl, Method, Task, Factorization, factorize
"""

from bench.hookspecs import hookimpl  # first: the modules below import it

from bench.calibration import Statistic  # noqa: E402
from bench.lowrank import Diagonal, Factorization, Identity, RightTransform, factorize, rank_for_ratio  # noqa: E402
from bench.method import Context, Method, NoConfig  # noqa: E402
from bench.task import EvalSettings, Measurement, Task  # noqa: E402

__version__ = "0.1.0"

__all__ = ["hookimpl", "Method", "Context", "NoConfig", "Task", "EvalSettings", "Measurement", "Statistic",
           "Factorization", "factorize", "rank_for_ratio", "RightTransform", "Identity", "Diagonal", "__version__"]
