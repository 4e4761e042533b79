"""An example method plugin: SVD with input channels weighted by column norms.

Load it with ``svdbench --plugins-dir examples/plugins run --methods colnorm_svd``.
It needs no calibration data: ``S = diag(||W[:, j]|| + eps)``.
"""

from dataclasses import dataclass

from bench import Diagonal, Method, factorize, hookimpl

__version__ = "0.1"


@dataclass(frozen=True)
class ColumnNormConfig:
    eps: float = 1e-6


class ColumnNormSVD(Method):
    name = "colnorm_svd"
    description = "SVD of W diag(column norms): weights input channels by their weight norm"
    config_class = ColumnNormConfig

    def decompose(self, target, weight, context, config):
        scale = weight.double().norm(dim=0) + config.eps
        return factorize(weight, Diagonal(scale))


@hookimpl
def register_methods(register):
    register(ColumnNormSVD())
