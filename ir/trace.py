"""torch.export tracing to a torch.fx GraphModule."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from effc.errors import UnsupportedError


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (at most 300 characters), for one-line errors."""
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def trace(module: nn.Module, example_inputs: dict[str, torch.Tensor]) -> torch.fx.GraphModule:
    """torch.export the module (static shapes) and return its FX GraphModule."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ep = torch.export.export(module, (), kwargs=example_inputs, strict=False)
    except Exception as e:  # torch raises many types here; all mean "cannot trace"
        raise UnsupportedError(
            f"torch.export could not trace {type(module).__name__}: {first_line(e)}"
        ) from e
    return ep.module()
