"""SVD-LLM with its sequential low-rank update: the paper's Table 4 ablation.

- ``svdllm``: truncation-aware whitening (:class:`methods.svdllm.SVDLLMWhitening`)
  followed by the update (:mod:`methods.update`) - the full method;
- ``svdllm_u``: vanilla SVD (:class:`methods.svd.VanillaSVD`) followed by the update;
- ``svdllm_w`` (whitening only) lives in :mod:`methods.svdllm`.

Both are plain compositions (``WithUpdate`` + the base class): decomposition,
rank allocation and the base's own refine facts are unchanged. The config is
:class:`methods.update.UpdateConfig` (LoRA r 8, alpha 16, lr 1e-4, cutoff
256 as in the reference; the step budget is sized for two CPU cores and is
set with ``--method-option svdllm.update_steps=N`` / ``.batch_size=B``).
"""

from __future__ import annotations

from bench import PaperNotes, hookimpl
from methods.svd import VanillaSVD
from methods.svdllm import CALIBRATION_DEVIATION, SVD_LLM_PAPER, SVDLLMWhitening
from methods.update import UPDATE_DEVIATIONS, UPDATE_PAPER_DEFAULTS, WithUpdate


class SVDLLM(WithUpdate, SVDLLMWhitening):
    name = "svdllm"
    description = "SVD-LLM: truncation-aware whitening + sequential LoRA update of W_u then W_v"
    components = {"transform": "whitening", "update": "yes"}
    notes = PaperNotes(paper=SVD_LLM_PAPER,
                       paper_defaults="whitening as svdllm_w, then the update: " + UPDATE_PAPER_DEFAULTS,
                       deviations=(CALIBRATION_DEVIATION, *UPDATE_DEVIATIONS))


class SVDLLMUpdateOnly(WithUpdate, VanillaSVD):
    name = "svdllm_u"
    description = "SVD-LLM ablation: vanilla SVD + sequential LoRA update of W_u then W_v"
    components = {"transform": "none", "update": "yes"}
    notes = PaperNotes(paper=SVD_LLM_PAPER + " (Table 4 ablation)",
                       paper_defaults="vanilla SVD, then the update: " + UPDATE_PAPER_DEFAULTS,
                       deviations=UPDATE_DEVIATIONS)


@hookimpl
def register_methods(register):
    register(SVDLLM())
    register(SVDLLMUpdateOnly())
