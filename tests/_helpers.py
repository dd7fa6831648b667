"""Helpers for pass tests: build models from ONNX text, run passes, compare on random inputs."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir
import pytest
import torch

import effc
from effc.errors import UnsupportedError
from effc.ir.model import OnnxModel
from effc.numerics import compare_outputs
from effc.pipeline import eval_inputs
from effc.runtime.format import from_quantized


def from_text(text: str, initializers: dict[str, np.ndarray] | None = None) -> OnnxModel:
    proto = onnx.parser.parse_model(text)
    for name, arr in (initializers or {}).items():
        proto.graph.initializer.append(onnx.numpy_helper.from_array(arr, name))
    onnx.checker.check_model(proto)
    return OnnxModel(ir.serde.deserialize_model(proto))


def op_types(model: OnnxModel) -> list[str]:
    return [n.op_type for n in model.model.graph]


def run_pass(text: str, model: OnnxModel, seeds: int = 3):
    """Run pipeline ``text``; return (new model, record, worst comparison over ``seeds`` inputs)."""
    inputs = eval_inputs(effc.PassContext(eval_seeds=seeds), model)
    before = [model.run(x) for x in inputs]
    result = effc.Pipeline.from_text(text).run(model)
    after = [result.model.run(x) for x in inputs]
    worst = {"ok": True, "identical": True, "max_abs": 0.0}
    for b, a in zip(before, after):
        cmp = compare_outputs(b, a)
        worst["ok"] &= cmp["ok"]
        worst["identical"] &= cmp["identical"]
        worst["max_abs"] = max(worst["max_abs"], cmp["max_abs"])
    return result.model, result.report.records[-1], worst


def rng_array(*shape, seed=0, scale=1.0, positive=False):
    a = np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * scale
    return np.abs(a) + 0.5 if positive else a


def random_matrix(out=8, inp=64, group=16, bits=4, density=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    ng = inp // group
    codes = torch.randint(0, 2**bits, (out, ng, group), dtype=torch.uint8, generator=g)
    scales = torch.rand(out, ng, generator=g) + 0.01
    zeros = torch.randint(0, 2**bits, (out, ng), dtype=torch.uint8, generator=g)
    mask = torch.rand(out, ng, generator=g) < density
    return from_quantized(codes, scales, zeros, mask, bits), (codes, scales, zeros, mask)


def token_calibration(n=3, vocab=256, seq=16, seed=0, mask=False):
    """``n`` calibration samples of random token ids for the tiny LLaMA (with all-ones
    attention masks if ``mask``)."""
    rng = np.random.default_rng(seed)
    out = [{"input_ids": rng.integers(0, vocab, (1, seq)).astype(np.int64)} for _ in range(n)]
    if mask:
        for x in out:
            x["attention_mask"] = np.ones((1, seq), dtype=np.int64)
    return out


def real_folder(getter):
    """The folder of a real model (``effc.models.real``), or skip where it cannot be had."""
    pytest.importorskip("transformers")
    try:
        return getter()
    except UnsupportedError as e:
        pytest.skip(str(e))


def one_line_error(code, out, err, match):
    """What the CLI gives bad input: exit code 2 and one line on stderr naming the problem,
    no traceback."""
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("effc: error:"), err
    assert match in lines[0], err
    assert "Traceback" not in err
