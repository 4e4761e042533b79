"""The ``weight_grad`` statistic: the mean gradient of the calibration LM loss with respect to each target weight.

``dL/dW`` (out x in, float64), averaged over the calibration windows it
observes; ``L`` is the mean next-token cross-entropy of one window (the
model's own loss with ``labels = input_ids``). ZS-SVD projects it on each
singular pair of the whitened weight.

Statistics read the run's calibration windows (there are no per-statistic
windows): ``weight_grad`` observes the first window only, as the authors'
scripts (``--nsamples_gradient_subset 1``, mint-vu/Zero-Sum-SVD
``scripts/run_one_shot.sh``); ``weight_grad_all`` observes every window. The
tokens per window are ``--calib-seqlen`` (the authors': 2048; svdbench's
default: 512). Another count is one subclass away (``windows = 8``, a new
name). The gradient pass stops after the last window any statistic observes.

Size: one float64 matrix per target, i.e. 8 bytes per compressed weight in
the statistics store (about 0.8 GB for SmolLM2-135M).
"""

from __future__ import annotations

from bench import Statistic, hookimpl


class WeightGrad(Statistic):
    name = "weight_grad"
    description = "mean LM-loss gradient dL/dW per target weight over the first calibration window (float64)"
    needs_backward = True
    windows = 1

    def observe(self, key, tensor):
        self.add(key, tensor.double(), 1)

    def result(self):
        return {k: v / self.counts[k] for k, v in self.sums.items()}


class WeightGradAll(WeightGrad):
    name = "weight_grad_all"
    description = "mean LM-loss gradient dL/dW per target weight over every calibration window (float64)"
    windows = None


@hookimpl
def register_statistics(register):
    for statistic in (WeightGrad(), WeightGradAll()):
        register(statistic)
