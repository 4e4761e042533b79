"""``import bench.interop.hf``: the one line that lets plain transformers load models saved by svdbench.

It registers the quantization method ``svdbench`` (:mod:`bench.model.hf_quantizer`) with transformers, and
the saving layouts of every installed plugin's quantizers (``register_layouts``); then
``AutoModelForCausalLM.from_pretrained(DIR)`` builds svdbench's low-rank and quantized layers and loads their
weights strictly. Never ``trust_remote_code``.
"""

from bench.engine.plugins import load_registry
from bench.model.hf_quantizer import register

register()
load_registry()  # installed plugins' quantized layouts: their saved models load too
