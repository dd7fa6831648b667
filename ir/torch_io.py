"""Torch side of the IR layer: resolve model references, trace with torch.export, lower to ONNX.

Model references (DESIGN.md section 7): an ``.onnx`` file; ``builtin:NAME`` (effc.models);
``py:module:factory`` (a user's nn.Module, whose ``example_inputs()`` names the inputs, or
``--shape``); an HF model folder (transformers, task from ``config.architectures``).
"""

from __future__ import annotations

import importlib
import io
import json
import logging
import os
import sys
import warnings
from pathlib import Path

import onnx
import onnx_ir as ir
import torch
from torch import nn

from effc.errors import InputError, UnsupportedError, did_you_mean
from effc.ir.model import FxModel, OnnxModel
from effc.ir.onnx_io import load_onnx
from effc.ir.trace import first_line
from effc.models import BUILTINS

log = logging.getLogger(__name__)
# The dynamo exporter warns on every export that torchvision (which effc never uses) is missing.
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)


class _PositionalAdapter(nn.Module):
    """Calls ``module.forward`` with keyword inputs for the TorchScript tracer, which passes
    positional arguments (and trips over HF forward decorators). The module's children are
    registered under their own names, so scopes and weight names stay those of the module."""

    def __init__(self, module: nn.Module, names: list[str]):
        super().__init__()
        object.__setattr__(self, "inner", module)
        self.names = names
        for name, child in module.named_children():
            self.add_module(name, child)
        for name, param in module.named_parameters(recurse=False):
            self.register_parameter(name, param)

    def forward(self, *args):
        return self.inner.forward(**dict(zip(self.names, args)))


def export_onnx(
    module: nn.Module,
    example_inputs: dict[str, torch.Tensor],
    legacy: bool = False,
    opset: int | None = None,
) -> ir.Model:
    """Lower a torch module to ONNX: the dynamo exporter by default, the TorchScript one if asked."""
    if not isinstance(module, torch.fx.GraphModule):  # exported graph modules refuse eval()
        module.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if legacy:
                buf = io.BytesIO()
                torch.onnx.export(
                    _PositionalAdapter(module, list(example_inputs)),
                    tuple(example_inputs.values()),
                    buf,
                    dynamo=False,
                    opset_version=opset or 14,
                    input_names=list(example_inputs),
                    do_constant_folding=True,
                )
                return ir.serde.deserialize_model(onnx.load_from_string(buf.getvalue()))
            prog = torch.onnx.export(
                module, (), kwargs=example_inputs, dynamo=True, opset_version=opset, verbose=False
            )
            return prog.model
    except Exception as e:
        kind = "legacy TorchScript" if legacy else "dynamo"
        raise UnsupportedError(
            f"the {kind} ONNX exporter failed on {type(module).__name__}: {first_line(e)}"
        ) from e


def _inputs_from_shapes(shapes: dict[str, list[int]], dtype=None) -> dict[str, torch.Tensor]:
    out = {}
    for name, shape in shapes.items():
        if "ids" in name or (dtype is not None and not dtype.is_floating_point):
            out[name] = torch.zeros(shape, dtype=dtype or torch.long)
        elif "mask" in name:
            out[name] = torch.ones(shape, dtype=torch.long)
        else:
            out[name] = torch.randn(shape, dtype=dtype or torch.float32)
    return out


def hf_example_inputs(config, seq: int = 16) -> dict[str, torch.Tensor]:
    """Token ids (in the vocabulary, seeded) and an all-ones attention mask for an HF model."""
    vocab = int(getattr(config, "vocab_size", None) or 1000)
    g = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(0, vocab, (1, seq), generator=g),
        "attention_mask": torch.ones(1, seq, dtype=torch.long),
    }


def is_hf_model(module: nn.Module) -> bool:
    """A transformers model (without importing transformers): a PreTrainedModel with a config."""
    return hasattr(module, "config") and any(
        c.__name__ == "PreTrainedModel" for c in type(module).__mro__
    )


def example_inputs_for(module: nn.Module, shapes: dict[str, list[int]] | None, ref: str):
    """The module's own ``example_inputs()`` (``--shape`` resizing the named ones), an HF model's
    token ids and mask from its config, else inputs made from ``--shape`` alone."""
    fn = getattr(module, "example_inputs", None)
    if callable(fn) or is_hf_model(module):
        inputs = dict(fn()) if callable(fn) else hf_example_inputs(module.config)
        unknown = sorted(set(shapes or {}) - set(inputs))
        if unknown:
            raise InputError(
                f"{ref}: --shape names {', '.join(unknown)}, but the model's inputs are "
                f"{', '.join(inputs)}"
            )
        for name, shape in (shapes or {}).items():
            if -1 in shape or len(shape) != inputs[name].dim():
                raise InputError(
                    f"--shape {name}: give all {inputs[name].dim()} dims of {ref}'s input"
                )
            inputs[name] = _inputs_from_shapes({name: shape}, inputs[name].dtype)[name]
        return inputs
    if shapes and all(-1 not in s for s in shapes.values()):
        return _inputs_from_shapes(shapes)
    raise InputError(
        f"{ref}: cannot tell the model's inputs; define example_inputs() on the module "
        "or pass --shape NAME=1x128 for each input"
    )


def _load_builtin(name: str) -> nn.Module:
    if name not in BUILTINS:
        raise InputError(
            f"unknown builtin model {name!r}{did_you_mean(name, BUILTINS)}; "
            f"available: {', '.join(sorted(BUILTINS))}"
        )
    return BUILTINS[name][0]()


def _load_py(ref: str) -> nn.Module:
    parts = ref.split(":")
    if len(parts) != 3 or not all(parts[1:]):
        raise InputError(f"{ref!r}: expected py:MODULE:FACTORY, e.g. py:mypkg.models:build")
    if os.getcwd() not in sys.path and "" not in sys.path:  # the user's own module, here
        sys.path.insert(0, os.getcwd())
    try:
        factory = getattr(importlib.import_module(parts[1]), parts[2])
    except (ImportError, AttributeError) as e:
        raise InputError(f"{ref!r}: {first_line(e)}") from e
    module = factory()
    if not isinstance(module, nn.Module):
        raise InputError(f"{ref!r}: the factory returned {type(module).__name__}, not nn.Module")
    return module


def load_hf_folder(folder: Path, task: str | None = None, seq: int = 16) -> tuple[nn.Module, dict]:
    """Load an HF model folder (safetensors only) for tracing; ``task`` in {causal-lm, base}."""
    try:
        import transformers
    except ImportError as e:
        raise UnsupportedError(
            "loading an HF model folder needs transformers: pip install 'effc[llm]'"
        ) from e
    config = json.loads((folder / "config.json").read_text())
    archs = config.get("architectures") or []
    causal = task == "causal-lm" or (task is None and any("CausalLM" in a for a in archs))
    # The HF model itself is traced (not a wrapper), so weight sites keep HF's module names.
    cls = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    model = cls.from_pretrained(folder, dtype=torch.float32, use_safetensors=True).eval()
    model.config.use_cache = False  # effc's own copy: plain tensors out, also for export_onnx
    return model, hf_example_inputs(model.config, seq)


def resolve_torch(ref: str, shapes: dict | None = None, task: str | None = None):
    """Resolve a non-ONNX reference to (module, example_inputs)."""
    if ref.startswith("builtin:"):
        module = _load_builtin(ref.removeprefix("builtin:"))
    elif ref.startswith("py:"):
        module = _load_py(ref)
    else:
        path = Path(ref)
        if not path.exists():
            raise InputError(f"no such file or folder: {ref}")
        if not (path.is_dir() and (path / "config.json").is_file()):
            raise InputError(
                f"{ref}: not a model reference; expected an .onnx file, an HF model folder "
                "(with config.json), builtin:NAME or py:MODULE:FACTORY"
            )
        return load_hf_folder(path, task)
    return module.eval(), example_inputs_for(module, shapes, ref)


def load_model(ref: str, shapes: dict | None = None, task: str | None = None):
    """Load any model reference as an FxModel (torch) or OnnxModel (``.onnx`` path)."""
    path = Path(ref)
    if ref.endswith(".onnx") or (path.is_file() and not ref.startswith(("builtin:", "py:"))):
        return OnnxModel(load_onnx(path), path)
    module, inputs = resolve_torch(ref, shapes, task)
    return FxModel(module, inputs)
