"""What a saved model's ``config.json`` says to transformers (see :mod:`bench.model.hf_quantizer`, which reads it).

``quantization_config``: the quantization method ``svdbench`` and the compressed layout. ``transformers_weights``:
the guard that stops a transformers without svdbench's quantizer from loading the weights at random.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

FORMAT = 2  # of the saved directory (bench.model.saving)
QUANT_METHOD = "svdbench"
INSTALL = "pip install 'svdbench[quant]'"
GUARD = (f"model.safetensors holds layers compressed by svdbench, which transformers alone would fill with random "
         f"weights: install svdbench ({INSTALL}) and run `import bench.interop.hf` before from_pretrained")
FINGERPRINT = "svdbench_fingerprint"  # key of the safetensors header metadata


def hf_quantization_config(ranks: dict, quantized: dict, dtype: str, shared: dict | None = None) -> dict:
    """The ``quantization_config`` entry for a model with this layout (``shared``: tied factors, where any)."""
    from importlib.metadata import version

    return {"quant_method": QUANT_METHOD, "format": FORMAT, "saved_dtype": dtype, "ranks": ranks,
            "quantized": quantized, "svdbench_version": version("svdbench"), **({"shared": shared} if shared else {})}


def write_config(model_config, directory: Path, ranks: dict, quantized: dict, dtype: str,
                 shared: dict | None = None) -> None:
    """Write ``config.json`` saying what the saved weights are: svdbench's quantization config (in place of any
    the source had: a gguf one is not true of them) and the guard."""
    config = copy.deepcopy(model_config)
    config.quantization_config = hf_quantization_config(ranks, quantized, dtype, shared)
    config.save_pretrained(directory)
    path = Path(directory) / "config.json"
    data = json.loads(path.read_text())
    data["transformers_weights"] = GUARD  # after save_pretrained, which drops this key
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
