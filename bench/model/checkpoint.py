"""Building a model from a checkpoint on disk, one tensor at a time.

A compressed model is assembled without the dense model in memory: the
architecture comes from ``config.json`` (parameters created on the ``meta``
device, so they take no memory), chosen modules are replaced (the low-rank
layers built from the factor store), and every other parameter is read from
the checkpoint's safetensors files tensor by tensor. Each file is opened,
read and closed per group of tensors, so its pages are not left mapped in the
process (they would count in its resident memory).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from bench.errors import UsageError
from bench.model.prepare import prepare_model
from bench.model.targets import set_module


class Checkpoint:
    """The safetensors tensors of a Hugging Face model directory, by name."""

    def __init__(self, directory: Path | str):
        from safetensors import safe_open

        self.directory = Path(directory)
        files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            raise UsageError(f"{self.directory} holds no .safetensors file; svdbench reads checkpoints in safetensors")
        self.file_of: dict[str, Path] = {}
        self.shape_of: dict[str, tuple[int, ...]] = {}
        for path in files:
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():
                    self.file_of[name] = path
                    self.shape_of[name] = tuple(handle.get_slice(name).get_shape())

    def config(self):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(self.directory)

    def read(self, names: list[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The named tensors (cast to ``dtype`` where given), each file opened once and closed after."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.file_of[name], []).append(name)
        out = {}
        for path, members in by_file.items():
            with safe_open(str(path), framework="pt") as handle:
                for name in members:
                    tensor = handle.get_tensor(name)
                    out[name] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
        return out


def empty_model(config, dtype: torch.dtype) -> nn.Module:
    """The architecture of ``config`` with its parameters on the meta device (its buffers are real)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        prepare_model(model)
    return model


def checkpoint_matches(model: nn.Module, directory: Path | str) -> bool:
    """Whether every parameter of ``model`` (tied ones excepted) is stored under its own name in ``directory``'s
    safetensors files, so a model can be assembled from them tensor by tensor.

    Not so for checkpoints whose names transformers converts on load (MoE experts fused from per-expert tensors,
    GPT-NeoX's ``embed_out``, a multimodal model's language model) or whose layers svdbench changes on load
    (GPT-2's transposed ``Conv1D``): such a model stays in memory instead (it is never assembled from the file).
    """
    try:
        shapes = Checkpoint(directory).shape_of
    except UsageError:
        return False
    return all(shapes.get(name) == tuple(p.shape) for name, p in model.named_parameters())  # tied ones listed once


def fill_from_checkpoint(model: nn.Module, checkpoint: Checkpoint, dtype: torch.dtype) -> nn.Module:
    """Load every parameter still on the meta device from ``checkpoint``; tie weights; eval mode.

    Raises ``KeyError`` when the checkpoint lacks a parameter the model needs
    (tied weights excepted) - the caller then loads the model another way.
    """
    missing = [name for name, p in model.named_parameters() if p.is_meta]
    tied = set(getattr(model, "_tied_weights_keys", None) or ())
    present = [name for name in missing if name in checkpoint.file_of]
    absent = [name for name in missing if name not in checkpoint.file_of and name not in tied]
    if absent:
        raise KeyError(f"{checkpoint.directory} lacks {absent[0]}")
    for name, tensor in checkpoint.read(present, dtype).items():
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=module._parameters[attr].requires_grad)
    model.tie_weights()
    still = [name for name, p in model.named_parameters() if p.is_meta]
    if still:
        raise KeyError(f"{checkpoint.directory} leaves {still[0]} unset")
    return model.eval()


def build_from_checkpoint(checkpoint: Checkpoint, dtype: torch.dtype, replacements: dict[str, nn.Module]) -> nn.Module:
    """The checkpoint's model with ``replacements`` (module path -> module) put in before any weight is read."""
    model = empty_model(checkpoint.config(), dtype)
    for name, module in replacements.items():
        set_module(model, name, module)
    return fill_from_checkpoint(model, checkpoint, dtype)


def is_checkpoint(directory: Path | str) -> bool:
    directory = Path(directory)
    try:
        json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return any(directory.glob("*.safetensors"))
