"""Vanilla truncated SVD (``svd``): ``S = I``, blind to data.

Optimal in ``||W - W'||_F`` (Eckart-Young) but not in the layer's output
error, which is why it collapses early on LLMs (SVD-LLM Table 1).
"""

from __future__ import annotations

from bench import Factorization, Method, PaperNotes, factorize, hookimpl


class VanillaSVD(Method):
    name = "svd"
    description = "truncated SVD of each weight matrix (no calibration data)"
    components = {"transform": "none", "update": "no"}
    notes = PaperNotes(
        paper="Eckart-Young truncated SVD; the baseline row of SVD-LLM (Wang et al., ICLR 2025, Table 1)",
        paper_defaults="no calibration data; every matrix at the rank of the target ratio",
    )

    def decompose(self, target, weight, context, config) -> Factorization:
        return factorize(weight)


@hookimpl
def register_methods(register):
    register(VanillaSVD())
