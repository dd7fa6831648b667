"""bsr-pack: rewrite compressed MatMul sites into ``ai.onnx.contrib::BSRMatMul`` nodes that carry
the packed BSR arrays (the ``bsr`` target's legalization pass; ONNX only).

Each quantized site (int4/int8 codes in the compression state, optionally a group-pruning mask)
becomes ``BSRMatMul(x, indptr, indices, values, scales, zeros)`` with ``out_features``, ``group``
and ``bits`` attributes (``BSRMatMulA8``, same inputs and attributes, where ``activations=int8``
runs that int4 layer with int8 activations); the fp32 weight initializer goes away. Per layer
(``decide=true``), the BSR kernel is timed against a dense MatMul at ``batch`` rows as the layer
runs in a model (weights streamed from a rotation larger than the L3, interleaved medians); the
layer stays a dense MatMul of its fake-quantized weights only where dense is faster by more than
5% (ties go to the smaller, packed form). ``decisions=FILE`` pins layers' choices (a JSON map, or
the ``report.json`` of an earlier compile) for reproducible artifacts; the timings are reported. Exact with respect to the fake-quantized model (the
kernels compute the same products in fp32); ``activations=int8`` is the opt-in lossy mode
(x quantized to int8 per block of the group, integer dot products; see runtime/modules.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import onnx_ir as ir
import onnx_ir.passes.common as common
import torch

from effc.errors import InputError
from effc.ir.sites import weight_sites
from effc.pass_base import Pass, PassResult
from effc.registry import register
from effc.runtime.modules import check_activations, matrix_from_state, measure_choice
from effc.runtime.ort_op import DOMAIN, OP, OP_A8


def load_decisions(path: str) -> dict[str, str]:
    """{layer: "sparse" | "dense"} from a JSON file: such a map, or an effc ``report.json`` (its
    bsr-pack record's per-layer choices), so a compile can repeat another's decisions."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"pass 'bsr-pack': cannot read decisions file {path} ({e})") from e
    if isinstance(data, dict) and "passes" in data:  # a report: the last bsr-pack's choices
        packs = [p for p in data["passes"] if isinstance(p, dict) and p.get("name") == "bsr-pack"]
        layers = packs[-1].get("stats", {}).get("layers", []) if packs else None
        data = {r["layer"]: r["choice"] for r in layers or [] if isinstance(r, dict)}
        if not data:
            raise InputError(f"pass 'bsr-pack': report {path} has no bsr-pack decisions")
    if not isinstance(data, dict) or not all(v in ("sparse", "dense") for v in data.values()):
        raise InputError(
            f'pass \'bsr-pack\': decisions file {path} must map layers to "sparse" or "dense"'
        )
    return data


def rewrite(
    model,
    batch: int = 1,
    decide: bool = True,
    activations: str = "fp32",
    pinned: dict[str, str] | None = None,
) -> list[dict]:
    """Replace compressed MatMul sites of an OnnxModel by BSRMatMul nodes; return per-layer
    records. ``pinned`` layers take their given choice; the others are timed when ``decide``."""
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
        if pinned and site.fqn in pinned:
            record.update(choice=pinned[site.fqn], pinned=True)
        elif decide:
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
        decisions: str = ""  # a JSON file (or a report.json) pinning layers' sparse/dense choice

    def __init__(self, **options):
        super().__init__(**options)
        # int8 activations change the numerics: the pipeline then measures and reports the error
        # instead of holding the pass to fp32 tolerance
        self.lossy = self.options.activations == "int8"

    def run(self, model, ctx) -> PassResult:
        o = self.options
        pinned = load_decisions(o.decisions) if o.decisions else None
        records = rewrite(model, o.batch, o.decide, o.activations, pinned)
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
