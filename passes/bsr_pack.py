"""bsr-pack: rewrite compressed MatMul sites into ``ai.onnx.contrib::BSRMatMul`` nodes that carry
the packed BSR arrays (the ``bsr`` target's legalization pass; ONNX only).

Each site with a quantization annotation (int4/int8, optionally a group-pruning mask) becomes
``BSRMatMul(x, indptr, indices, values, scales, zeros)`` with ``out_features``, ``group`` and
``bits`` attributes (``BSRMatMulA8``, same inputs and attributes, where ``activations=int8``
runs that int4 layer with int8 activations); the fp32 weight initializer goes away. Per layer, the BSR kernel is timed
against a dense MatMul at ``batch`` rows; where dense wins (``decide=true``), the layer stays a
dense MatMul of its fake-quantized weights. Exact with respect to the fake-quantized model (the
kernels compute the same products in fp32); ``activations=int8`` is the opt-in lossy mode
(x quantized to int8 per block of the group, integer dot products; see runtime/modules.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import onnx_ir as ir
import onnx_ir.passes.common as common
import torch

from effc.ir.sites import weight_sites
from effc.pass_base import Pass, PassResult
from effc.registry import register
from effc.runtime.modules import check_activations, matrix_from_state, measure_choice
from effc.runtime.ort_op import DOMAIN, OP, OP_A8


def rewrite(model, batch: int = 1, decide: bool = True, activations: str = "fp32") -> list[dict]:
    """Replace compressed MatMul sites of an OnnxModel by BSRMatMul nodes; return per-layer records."""
    graph = model.model.graph
    records = []
    for site in weight_sites(model):
        state = model.compression.get(site.fqn)
        if state is None or state.bits not in (4, 8) or site.node.op_type != "MatMul":
            continue
        matrix = matrix_from_state(state)
        out, inp = matrix.shape
        record = {
            "layer": site.fqn,
            "shape": [out, inp],
            "density": round(matrix.density, 6),
            "bytes": matrix.nbytes(),
            "dense_fp32_bytes": out * inp * 4,
            "choice": "sparse",
            "activations": "int8" if check_activations(activations, matrix.bits) else "fp32",
        }
        if decide:
            record.update(measure_choice(matrix, batch, activations))
        records.append(record)
        if record["choice"] != "sparse":
            continue
        inits = []
        for key, tensor in matrix.tensors().items():
            if key == "scales":  # fp16 bits as uint16: the Python custom-op API has no float16
                tensor = tensor.view(torch.uint16)

            value = ir.Value(name=f"{site.fqn}.bsr.{key}", const_value=ir.tensor(tensor.numpy()))
            value.shape = ir.Shape(list(tensor.shape))
            value.dtype = value.const_value.dtype
            graph.register_initializer(value)
            inits.append(value)
        node = site.node
        new = ir.node(
            OP_A8 if record["activations"] == "int8" else OP,
            [node.inputs[0], *inits],
            domain=DOMAIN,
            attributes={
                "out_features": out,
                "group": matrix.group,
                "bits": matrix.bits,
            },
            name=f"{site.fqn}.bsr",
        )
        # the kernel's output is float32 whatever the input file annotated (files from
        # onnx.helper and other exporters carry no value_info for intermediate values)
        new.outputs[0].shape, new.outputs[0].dtype = node.outputs[0].shape, ir.DataType.FLOAT
        graph.insert_before(node, new)
        old = node.outputs[0]
        old.replace_all_uses_with(new.outputs[0], replace_graph_outputs=True)
        if new.outputs[0] in graph.outputs:
            name = old.name
            old.name = None
            new.outputs[0].name = name
        graph.remove(node, safe=True)

    if records:
        model.model.opset_imports.setdefault(DOMAIN, 1)
        common.RemoveUnusedNodesPass()(model.model)
    return records


@register
class BSRPack(Pass):
    """Pack quantized (and group-pruned) MatMul weights into BSR kernel nodes."""

    name = "bsr-pack"
    kinds = ("onnx",)

    @dataclass
    class Options:
        batch: int = 1
        decide: bool = True
        activations: Literal["fp32", "int8"] = "fp32"  # int8: opt-in lossy int8-x mode (int4)

    def __init__(self, **options):
        super().__init__(**options)
        # int8 activations change the numerics: the pipeline then measures and reports the error
        # instead of holding the pass to fp32 tolerance
        self.lossy = self.options.activations == "int8"

    def run(self, model, ctx) -> PassResult:
        records = rewrite(model, self.options.batch, self.options.decide, self.options.activations)
        sparse = [r for r in records if r["choice"] == "sparse"]
        stats = {
            "layers_packed": len(sparse),
            "layers_dense": len(records) - len(sparse),
            "activations": self.options.activations,
            "bsr_bytes": {
                k: sum(r["bytes"][k] for r in sparse) for k in ("values", "indices", "scales")
            },
            "layers": records,
        }
        return PassResult(model, bool(sparse), stats)
