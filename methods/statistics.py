"""The built-in calibration statistics, a plugin like the methods that ask for them.

All accumulate in float64: ``gram`` (X X^T per input group, SVD-LLM and its
successors), ``hidden_gram`` (H H^T of the hidden states entering each decoder
block, DipSVD's compressibility), ``abs_mean`` (ASVD), ``fisher`` (FWSVD) and
``grad_norm`` (DipSVD's importance), ``block_importance`` (AdaSVD's adaCR:
``1 - cos`` of each decoder block's input and output hidden states per token,
averaged over the calibration tokens, ShortGPT's block influence).
"""

from __future__ import annotations

import torch

from bench import Statistic, hookimpl


class Gram(Statistic):
    name = "gram"
    description = "G = X X^T per input group (sum over calibration tokens, float64)"

    def observe(self, key, tensor):
        """Accumulate ``X^T X`` in place (``addmm_``): no n x n temporary beside the sum, which for an MLP's
        down projection (n = its input width) is the largest allocation of the statistics pass."""
        x = tensor.double()
        if key in self.sums:
            self.sums[key].addmm_(x.T, x)
            self.counts[key] += x.shape[0]
        else:
            self.sums[key], self.counts[key] = x.T @ x, x.shape[0]


class HiddenGram(Gram):
    name = "hidden_gram"
    description = "H H^T of the hidden states entering each decoder block, keyed by the block's path (float64)"
    scope = "block"


class BlockImportance(Statistic):
    name = "block_importance"
    description = "mean over calibration tokens of 1 - cos(block input, block output), per decoder block (float64)"
    scope = "block_io"

    def observe(self, key, tensor):
        x, y = tensor.double()
        cos = torch.nn.functional.cosine_similarity(x, y, dim=-1, eps=1e-12)
        self.add(key, (1 - cos).sum().reshape(1), x.shape[0])

    def result(self):
        return {k: v / self.counts[k] for k, v in self.sums.items()}


class AbsMean(Statistic):
    name = "abs_mean"
    description = "mean |x| per input channel (ASVD)"

    def observe(self, key, tensor):
        self.add(key, tensor.double().abs().sum(0), tensor.shape[0])

    def result(self):
        return {k: v / self.counts[k] for k, v in self.sums.items()}


class Fisher(Statistic):
    name = "fisher"
    description = "mean squared LM-loss gradient per weight, summed over output rows: one value per input channel (FWSVD)"
    needs_backward = True

    def observe(self, key, tensor):
        self.add(key, tensor.double().pow(2).sum(0), 1)

    def result(self):
        return {k: v / self.counts[k] for k, v in self.sums.items()}


class GradNorm(Statistic):
    name = "grad_norm"
    description = "mean Frobenius norm of the LM-loss gradient per weight matrix (DipSVD importance)"
    needs_backward = True

    def observe(self, key, tensor):
        self.add(key, tensor.double().norm().reshape(1), 1)

    def result(self):
        return {k: v / self.counts[k] for k, v in self.sums.items()}


@hookimpl
def register_statistics(register):
    for statistic in (Gram(), HiddenGram(), BlockImportance(), AbsMean(), Fisher(), GradNorm()):
        register(statistic)
