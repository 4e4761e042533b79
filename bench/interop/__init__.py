"""Compressed models outside svdbench: plain transformers (:mod:`bench.interop.hf`), lm-eval's own CLI
(:mod:`bench.interop.lm_eval`) and a one-call Python API for notebooks (:mod:`bench.interop.api`).

Nothing here is imported by ``import bench``: ``import bench.interop.hf`` is the one line that teaches
transformers to load saved svdbench models.
"""
