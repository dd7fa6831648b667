"""Small model builders in code, addressed from the CLI as ``builtin:NAME``.

Every builder returns an ``nn.Module`` in eval mode with an ``example_inputs()`` method that
returns a dict of named example tensors (the names become the exported graph's inputs).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from effc.models.cnn import TinyCNN
from effc.models.ditn import DITN, DITNConfig, load_trained
from effc.models.llama import LlamaConfig, LlamaForCausalLM


def _tiny_llama() -> nn.Module:
    import torch

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig()).eval()


def _ditn() -> nn.Module:
    import torch

    torch.manual_seed(0)
    return DITN(DITNConfig()).eval()


BUILTINS: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "tiny-cnn": (TinyCNN, "MobileNet-style CNN, conv/BN/ReLU6 + depthwise blocks, 32x32 input"),
    "tiny-llama": (_tiny_llama, "LLaMA-style decoder, 2 layers, hidden 64, tied embeddings"),
    "ditn": (_ditn, "DITN-style x2 super-resolution, random weights, channel LayerNorm"),
    "ditn-x2": (load_trained, "DITN-style x2 super-resolution trained on skimage images"),
}

__all__ = ["BUILTINS", "DITN", "DITNConfig", "LlamaConfig", "LlamaForCausalLM", "TinyCNN"]
