"""A third-party quantizer with its own saving layout: ``svdbench compress`` saves it, svdbench and plain
transformers load it back exactly, and without the plugin the saved model is refused (never random weights)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from conftest import tiny_model

from bench.cli.main import main
from bench.model.loading import load_model
from bench.model.manifest import MANIFEST
from bench.model.reload import load_compressed

PLUGIN = '''
import torch
from torch import nn

from bench import Allocation, Method, QuantizedLayout, hookimpl, set_module


class RowInt8Linear(nn.Module):
    """int8 weights with one float scale per output row."""

    def __init__(self, in_features, out_features, bias):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features, 1))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def quantize(cls, linear):
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127
        module = cls(linear.in_features, linear.out_features, linear.bias is not None)
        module.qweight.copy_(torch.round(weight / scale).to(torch.int8))
        module.scale.copy_(scale)
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.detach())
        return module

    def forward(self, x):
        return nn.functional.linear(x, (self.qweight.float() * self.scale).to(x.dtype), self.bias)


class RowInt8Layout(QuantizedLayout):
    quantizer = "rowint8"

    def describe(self, module):
        if not isinstance(module, RowInt8Linear):
            return None
        return {"quantizer": self.quantizer, "in_features": module.in_features,
                "out_features": module.out_features, "bias": module.bias is not None}

    def validate(self, entry, dense, where):
        self.check(set(entry) == {"quantizer", "in_features", "out_features", "bias"}, where, "unexpected keys")
        self.check_linear(entry, dense, where)

    def build(self, entry):
        return RowInt8Linear(entry["in_features"], entry["out_features"], entry["bias"])


class RowInt8(Method):
    name = "rowint8"
    uses_ratio = False

    def storage_bits(self):
        return 8

    def allocate(self, ratio, factorizations, context, config):
        return Allocation(dict.fromkeys((t.name for t in context.targets), None))  # all stay dense

    def refine(self, model, ratio, context, config):
        for target in context.targets:
            set_module(model, target.name, RowInt8Linear.quantize(model.get_submodule(target.name)))
        return {"linears_quantized": len(context.targets)}


@hookimpl
def register_methods(register):
    register(RowInt8())


@hookimpl
def register_layouts(register):
    register(RowInt8Layout())
'''


def _logits(model):
    ids = torch.arange(40).reshape(2, 20) % 200
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_a_plugin_quantizer_is_saved_and_reloaded_with_its_own_layout(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("SVDBENCH_CACHE", str(tmp_path / "cache"))
    plugins, source, out = tmp_path / "plugins", tmp_path / "src", tmp_path / "out"
    plugins.mkdir()
    (plugins / "rowint8.py").write_text(PLUGIN)
    dense = tiny_model("llama", vocab_size=len(tokenizer), layers=2)
    dense.save_pretrained(source)
    tokenizer.save_pretrained(source)
    assert main(["--plugins-dir", str(plugins), "compress", "--model", str(source), "--method", "rowint8",
                 "--out", str(out)]) == 0

    manifest = json.loads((out / MANIFEST).read_text())
    assert {entry["quantizer"] for entry in manifest["quantized"].values()} == {"rowint8"}
    assert len(manifest["quantized"]) == 14  # every linear of the two blocks
    reloaded = load_compressed(out).model
    assert type(reloaded.model.layers[0].mlp.down_proj).__name__ == "RowInt8Linear"
    assert reloaded.model.layers[0].mlp.down_proj.qweight.dtype == torch.int8
    expected = _logits(reloaded)
    assert not torch.equal(expected, _logits(dense))  # quantized, not the dense weights
    assert torch.equal(_logits(load_model(str(out)).model), expected)

    from transformers import AutoModelForCausalLM

    import bench.interop.hf  # noqa: F401  (registers the svdbench quantization method)

    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    assert torch.equal(_logits(plain), expected)

    # a fresh interpreter without the plugin: refused in one line naming the quantizer and the fix
    script = (f"from bench.model.reload import load_compressed\n"
              f"try:\n    load_compressed({str(out)!r})\nexcept Exception as error:\n    print(error)\n"
              f"else:\n    print('LOADED')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parent.parent)
    message = done.stdout.strip().splitlines()[-1]
    assert "LOADED" not in message and "'rowint8'" in message and "--plugins-dir" in message, done.stdout
