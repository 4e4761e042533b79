"""Fisher-weighted SVD (``fwsvd``, Hsu et al., ICLR 2022).

Fisher information per weight ``I_ij`` = mean over calibration samples of
``(dL/dW_ij)^2`` (L = the LM loss; the ``fisher`` statistic, labels passed
once and shifted by the model). Per input channel ``f_j = sum_i I_ij`` and
``S = diag(sqrt(f_j) + eps)``; ``SVD(W S)`` is truncated as in every method,
so the error is weighted by how much each input channel matters to the loss.

``eps`` is taken relative to the mean of ``sqrt(f)`` (``eps * mean sqrt(f)``)
rather than as an absolute number, because the Fisher's scale depends on the
loss normalization and on the model: a fixed ``1e-6`` would be negligible for
one model and dominant for another. Its only job is to keep ``S`` invertible
for channels whose gradient is zero on the calibration data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bench import Diagonal, Factorization, Method, PaperNotes, UsageError, factorize, hookimpl


@dataclass(frozen=True)
class FWSVDConfig:
    eps: float = 1e-6  # added to sqrt(f_j), relative to mean(sqrt(f))

    def __post_init__(self):
        if not self.eps > 0:
            raise UsageError(f"fwsvd.eps must be > 0 (it keeps S invertible), got {self.eps}")


def fisher_scale(fisher: torch.Tensor, eps: float) -> torch.Tensor:
    """The diagonal of ``S``: ``sqrt(f_j) + eps * mean(sqrt(f))`` (float64)."""
    root = fisher.to(torch.float64).clamp_min(0).sqrt()
    floor = eps * float(root.mean()) if float(root.mean()) > 0 else eps
    return root + floor


class FisherWeightedSVD(Method):
    name = "fwsvd"
    description = "Fisher-weighted SVD: input channels scaled by sqrt of their summed Fisher information"
    config_class = FWSVDConfig
    requires = ("fisher",)
    notes = PaperNotes(
        paper="Hsu, Hua, Tang, Wen, Hsieh, Jin: Language Model Compression with Weighted Low-Rank Factorization "
              "(FWSVD), ICLR 2022",
        paper_defaults="Fisher information from the gradients of the task loss on the training data of fine-tuned "
                       "BERT-size models; every matrix at one rank",
        deviations=(
            "Fisher of the LM loss on the calibration windows (no official LLM code exists; METHODS.md): one value "
            "per input channel, the squared gradients summed over output rows",
            "eps relative to mean sqrt(f) rather than absolute, so it only keeps S invertible whatever the loss scale",
        ),
    )

    def decompose(self, target, weight, context, config) -> Factorization:
        return factorize(weight, Diagonal(fisher_scale(context.stats.get("fisher", target.name), config.eps)))


@hookimpl
def register_methods(register):
    register(FisherWeightedSVD())
