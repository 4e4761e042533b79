"""SVD-LLM truncation-aware whitening (``svdllm_w``, Wang et al., ICLR 2025).

``S = cholesky(G)`` with ``G = X X^T`` of the layer's calibration inputs
(float64); ``SVD(W S)`` is truncated as in every method. With this ``S`` the
output error is exactly the truncated spectrum:
``||W X - W' X||_F^2 = sum over dropped sigma_i^2`` (tested), so truncating
the smallest singular values is the best choice for the layer's output.

When ``G`` is not positive definite (few calibration tokens, dead channels)
the reference adds ``(-lambda_min + 1e-6) I`` and retries
(:func:`bench.cholesky_whitening`); the layer and the shift are logged and
returned in the factorization's facts, so that they land in results.json.

This module holds the whitening only. The variants with SVD-LLM's LoRA update
(``svdllm``, ``svdllm_u``) subclass :class:`SVDLLMWhitening` elsewhere.
"""

from __future__ import annotations

import logging

from bench import Factorization, Method, PaperNotes, cholesky_whitening, factorize, hookimpl

log = logging.getLogger(__name__)

SVD_LLM_PAPER = ("Wang, Zheng, Wan, Zhang: SVD-LLM: Truncation-aware Singular Value Decomposition for Large Language "
                 "Model Compression, ICLR 2025")
CALIBRATION_DEVIATION = ("calibration from WikiText-2 validation (train is not vendored), 32 x 512 tokens by default "
                         "(`--profile paper`: 256 x 2048)")


class SVDLLMWhitening(Method):
    name = "svdllm_w"
    description = "SVD-LLM truncation-aware whitening: SVD of W chol(X X^T)"
    requires = ("gram",)
    components = {"transform": "whitening", "update": "no"}
    notes = PaperNotes(
        paper=SVD_LLM_PAPER,
        paper_defaults="S = cholesky(X X^T) from 256 x 2048 tokens of WikiText-2 train (seed 3), shifted by "
                       "(-lambda_min + 1e-6) I when not positive definite; one rank for every matrix",
        deviations=(CALIBRATION_DEVIATION,),
    )

    def decompose(self, target, weight, context, config) -> Factorization:
        transform, shift = cholesky_whitening(context.stats.get("gram", target.name))
        factorization = factorize(weight, transform)
        if shift:
            log.warning("%s: X X^T of %s is not positive definite; shifted by %.3g before Cholesky",
                        self.name, target.name, shift)
            factorization.facts["cholesky_shift"] = shift
        return factorization


@hookimpl
def register_methods(register):
    register(SVDLLMWhitening())
