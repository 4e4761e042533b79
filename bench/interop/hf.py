"""``import bench.interop.hf``: the one line that lets plain transformers load models saved by svdbench.

It registers the quantization method ``svdbench`` (:mod:`bench.model.hf_quantizer`) with transformers; then
``AutoModelForCausalLM.from_pretrained(DIR)`` builds svdbench's low-rank and quantized layers and loads their
weights strictly. Never ``trust_remote_code``.
"""

from bench.model.hf_quantizer import register

register()
