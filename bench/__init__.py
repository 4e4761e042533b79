"""svdbench: a harness that compares SVD compression methods for LLMs.

This module is the public plugin API. Plugins - the built-in methods, tasks,
statistics and reports as much as third-party ones - import only what it
exports::

    from bench import hookimpl, Method, Task, Factorization, factorize

The host's own sub-packages (``bench.engine``, ``bench.model``, ``bench.cli``)
are not part of the API.
"""

import importlib

# Each public name and the module that defines it. They are imported on first
# use (PEP 562), so `import bench` - and the `svdbench` command, which must set
# its thread policy before torch starts - does not import torch.
_API = {
    **dict.fromkeys(('Allocation', 'Budget', 'MatrixCost', 'as_allocation', 'bisect_scalar', 'greedy_steps',
                     'matrix_costs', 'round_ranks', 'solve_budget', 'truncation_curve', 'uniform_ranks',
                     'water_fill'), "bench.api.allocation"),
    **dict.fromkeys(('exact_saving', 'zero_sum_walk'), "bench.api.zero_sum"),
    **dict.fromkeys(('build_config', 'config_dict'), "bench.api.configs"),
    **dict.fromkeys(('SHARED', 'group_cost', 'group_key', 'share_factorization', 'shared_key'), "bench.api.grouped"),
    **dict.fromkeys(('Command', 'hookimpl'), "bench.api.hookspecs"),
    **dict.fromkeys(('Diagonal', 'Eigen', 'Factorization', 'Identity', 'LowerTriangular', 'RightTransform', 'cholesky_whitening', 'eigen_whitening', 'factorize', 'is_worth_factorizing', 'rank_for_ratio'), "bench.api.lowrank"),
    **dict.fromkeys(('Context', 'Method', 'NoConfig', 'PaperNotes'), "bench.api.method"),
    **dict.fromkeys(('DENSE', 'RESULTS_FILE', 'Record', 'format_budget', 'format_point', 'load_results'), "bench.api.record"),
    **dict.fromkeys(('CalibrationStats', 'Statistic'), "bench.api.statistic"),
    **dict.fromkeys(('METRIC_KINDS', 'EvalSettings', 'Measurement', 'Metric', 'Task'), "bench.api.task"),
    **dict.fromkeys(('EVALUATION_CORPORA', 'checksums', 'data_file', 'evaluation_text'), "bench.corpora"),
    **dict.fromkeys(('UsageError', 'unknown_name'), "bench.errors"),
    **dict.fromkeys(('LowRankLinear',), "bench.model.layers"),
    **dict.fromkeys(('QuantizedLayout',), "bench.model.layouts"),
    **dict.fromkeys(('StructuredAttention',), "bench.model.structured"),
    **dict.fromkeys(('RemappedLinear',), "bench.model.remapped"),
    **dict.fromkeys(('LatentKVAttention', 'attach_rotary', 'kv_accounting', 'latent_layers'),
                    "bench.model.latent_attention"),
    **dict.fromkeys(('first_nonfinite_module',), "bench.model.numerics"),
    **dict.fromkeys(('linear_function', 'onednn_linear_works', 'onednn_linears'), "bench.model.kernels"),
    **dict.fromkeys(('BITS', 'GPTQ_GROUP_SIZES', 'GPTQ_INSTALL', 'GPTQLinear', 'META_DTYPES', 'QuantizedLinear',
                     'gptq_quantize_linears', 'quantize_linears'), "bench.model.quantized"),
    **dict.fromkeys(('Target', 'decoder_blocks', 'execution_device', 'footprint', 'set_module'), "bench.model.targets"),
    **dict.fromkeys(('release_free_memory',), "bench.memory"),
    **dict.fromkeys(('JsonCache', 'atomic_write_text', 'cache_root', 'json_key', 'sha256_file'), "bench.storage"),
}

__version__ = "0.1.0"
__all__ = [*_API, "__version__"]


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'bench' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
