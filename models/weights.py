"""Small trained weights that ship with effc (safetensors, never pickle)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

WEIGHTS_DIR = Path(__file__).with_name("weights")


def save_weights(model: nn.Module, path: Path, metadata: dict[str, str]) -> None:
    """Write the state dict atomically, with string metadata (config, training, quality)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def load_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
