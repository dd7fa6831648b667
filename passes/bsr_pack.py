"""bsr-pack: rewrite compressed MatMul sites into ``ai.onnx.contrib::BSRMatMul`` nodes that carry
the packed BSR arrays (the ``bsr`` target's legalization pass; ONNX only).

Each quantized site (int4/int8 codes in the compression state, optionally a group-pruning mask)
becomes ``BSRMatMul(x, indptr, indices, values, scales, zeros)`` with ``out_features``, ``group``
and ``bits`` attributes (``BSRMatMulA8``, same inputs and attributes, where ``activations=int8``
runs that int4 layer with int8 activations); the fp32 weight initializer goes away. Per layer
(``decide=true``), the layer is timed as the artifact runs it, in onnxruntime: the BSR op (its
kernel behind the Python custom-op call, whose overhead counts) against the dense form, which is
``MatMulNBits`` of the same codes (onnxruntime's int4/int8 kernel; an fp32 MatMul of the
fake-quantized weight where MatMulNBits does not apply), weights streamed from a rotation of
copies, interleaved medians at ``batch`` rows. The layer takes the dense form only where it is
faster by more than 5% (ties go to the packed form), so the artifact is never slower than the
codes alone and stores no fp32 copy of a quantized MatMul weight. Quantized embedding tables
become ``GatherBlockQuantized`` lookups. ``decisions=FILE`` pins layers' choices (a JSON map, or
the ``report.json`` of an earlier compile) for reproducible artifacts; the timings are reported.
Exact with respect to the fake-quantized model (the kernels compute the same products in fp32);
``activations=int8`` is the opt-in lossy mode (x quantized to int8 per block of the group,
integer dot products; see runtime/modules.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common
import torch

from effc.errors import InputError
from effc.ir.ort import session_for
from effc.ir.sites import weight_sites
from effc.pass_base import Pass, PassResult
from effc.passes._codes import (
    MS_DOMAIN,
    gather_block_quantized,
    gathers_of,
    matmul_nbits,
    matmul_nbits_applies,
    nbits_applies,
    nbits_node,
    quantized_tables,
)
from effc.passes.fuse._onnx import initializer, replace
from effc.registry import register
from effc.runtime.modules import check_activations, choose, matrix_from_state
from effc.runtime.ort_op import DOMAIN, OP, OP_A8
from effc.runtime.timing import DECISION_ROTATE_BYTES, copies_for, interleaved_medians


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


def bsr_node(graph: ir.Graph, x: ir.Value, matrix, base: str, a8: bool) -> ir.Node:
    """A ``BSRMatMul(x, indptr, indices, values, scales, zeros)`` node (not yet inserted) whose
    packed arrays are new initializers of ``graph`` (fp16 scales as their uint16 bits: the
    Python custom-op API has no float16)."""
    inits = []
    for key, tensor in matrix.tensors().items():
        if key == "scales":
            tensor = tensor.view(torch.uint16)
        inits.append(initializer(graph, f"{base}.bsr.{key}", tensor.numpy()))
    out, _ = matrix.shape
    node = ir.node(
        OP_A8 if a8 else OP,
        [x, *inits],
        domain=DOMAIN,
        attributes={"out_features": out, "group": matrix.group, "bits": matrix.bits},
        name=f"{base}.bsr",
    )
    # the kernel's output is float32 whatever the input file annotated (files from onnx.helper
    # and other exporters carry no value_info for intermediate values)
    node.outputs[0].dtype = ir.DataType.FLOAT
    return node


def _layer_model(inp: int, batch: int, copies: int, build) -> ir.Model:
    """A model of ``copies`` independent copies of one layer on one input (``build(graph, x, i)``
    makes copy i), each its own output: timing it reads every copy's weights in turn."""
    x = ir.Value(name="x", shape=ir.Shape([batch, inp]), type=ir.TensorType(ir.DataType.FLOAT))
    graph = ir.Graph([x], [], nodes=[], opset_imports={"": 17, DOMAIN: 1, MS_DOMAIN: 1})
    for i in range(copies):
        node = build(graph, x, i)
        graph.append(node)
        node.outputs[0].name = f"y{i}"
        graph.outputs.append(node.outputs[0])
    return ir.Model(graph, ir_version=8)


def measure_in_onnxruntime(state, matrix, batch: int, a8: bool, threads: int | None) -> dict:
    """Time the layer as the artifact runs it, in onnxruntime: the BSR op (the kernel behind
    its Python custom-op call) against the dense form the layer would otherwise take
    (``MatMulNBits`` of the same codes where it applies, else an fp32 MatMul), each in a session
    of copies whose weights rotate through ``DECISION_ROTATE_BYTES`` (at most 32 copies);
    interleaved medians. The layer goes sparse unless dense is faster by more than 5%."""
    out, inp = matrix.shape
    nbits = nbits_applies(state)  # the layer is a MatMul (bsr-pack packs no other)
    dense_bytes = out * inp * (state.bits / 8 if nbits else 4)
    n = copies_for(int(dense_bytes), DECISION_ROTATE_BYTES, cap=32)
    weight = state.dequantized().numpy().T.copy()

    def dense(graph, x, i):
        if nbits:
            return nbits_node(graph, x, state, f"l{i}", 0)[0]
        node = ir.node("MatMul", [x, initializer(graph, f"w{i}", weight)])
        node.outputs[0].dtype = ir.DataType.FLOAT
        return node

    sessions = [
        session_for(_layer_model(inp, batch, n, build), threads)
        for build in (lambda g, x, i: bsr_node(g, x, matrix, f"l{i}", a8), dense)
    ]
    feeds = {"x": np.random.default_rng(0).standard_normal((batch, inp)).astype(np.float32)}
    sparse_ms, dense_ms = (
        t / n for t in interleaved_medians([lambda s=s: s.run(None, feeds) for s in sessions], 5)
    )
    return {
        "sparse_ms": round(sparse_ms, 5),
        "dense_ms": round(dense_ms, 5),
        "dense_form": "MatMulNBits" if nbits else "fp32",
        "rotation": n,
        "choice": choose(sparse_ms, dense_ms),
    }


def rewrite(
    model,
    batch: int = 1,
    decide: bool = True,
    activations: str = "fp32",
    pinned: dict[str, str] | None = None,
    threads: int | None = None,
) -> list[dict]:
    """Replace compressed MatMul sites of an OnnxModel by BSRMatMul nodes, or by MatMulNBits of
    their codes (fp32 where it does not apply) where that runs faster; return per-layer records.
    ``pinned`` layers take their given choice; the others are timed when ``decide``."""
    graph = model.model.graph
    records = []
    sites = weight_sites(model)
    tables = quantized_tables(model, sites)  # before the MatMuls' weights are replaced
    shared: dict[str, tuple] = {}  # layers stored as MatMulNBits: their initializers
    for site in sites:
        state = model.compression.get(site.fqn)
        if state is None or state.bits not in (4, 8) or site.node.op_type != "MatMul":
            continue
        matrix = matrix_from_state(state)
        out, inp = matrix.shape
        a8 = check_activations(activations, matrix.bits)
        record = {
            "layer": site.fqn,
            "shape": [out, inp],
            "density": round(matrix.density, 6),
            "bytes": matrix.nbytes(),
            "dense_fp32_bytes": out * inp * 4,
            "choice": "sparse",
            "activations": "int8" if a8 else "fp32",
        }
        if pinned and site.fqn in pinned:
            record.update(choice=pinned[site.fqn], pinned=True)
        elif decide:
            record.update(measure_in_onnxruntime(state, matrix, batch, a8, threads))
        records.append(record)
        if record["choice"] != "sparse":
            if matmul_nbits_applies(site, state):  # dense, as codes: the artifact stays small
                shared[site.fqn] = matmul_nbits(graph, site, state, 0)
                record["dense_form"] = "MatMulNBits"
                model.model.opset_imports.setdefault(MS_DOMAIN, 1)
            continue
        node = site.node
        new = bsr_node(graph, node.inputs[0], matrix, site.fqn, a8)
        new.outputs[0].shape = node.outputs[0].shape
        graph.insert_before(node, new)
        replace(node.outputs[0], new.outputs[0])
        graph.remove(node, safe=True)

    # quantized embedding tables: rows dequantized on lookup by onnxruntime's own op, reading the
    # codes of a tied lm_head stored as MatMulNBits (else, next to a BSR lm_head, its own copy)
    for table, state, via in tables:
        for gather in gathers_of(table):
            gather_block_quantized(graph, gather, state, shared.get(via))
            records.append(
                {
                    "layer": gather.name,
                    "choice": "lookup",
                    "bits": state.bits,
                    "tied": via in shared,
                }
            )
            model.model.opset_imports.setdefault(MS_DOMAIN, 1)
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
        records = rewrite(model, o.batch, o.decide, o.activations, pinned, ctx.threads)
        lookups = [r for r in records if r["choice"] == "lookup"]
        records = [r for r in records if r["choice"] != "lookup"]
        sparse = [r for r in records if r["choice"] == "sparse"]
        nbits = [
            r for r in records if r.get("dense_form") == "MatMulNBits" and r["choice"] != "sparse"
        ]
        stats = {
            "layers_packed": len(sparse),
            "layers_dense": len(records) - len(sparse),
            "layers_dense_codes": len(nbits),
            **({"tables_quantized": len(lookups)} if lookups else {}),
            "activations": self.options.activations,
            "bsr_bytes": {
                k: sum(r["bytes"][k] for r in sparse) for k in ("values", "indices", "scales")
            },
            "layers": records,
        }
        return PassResult(model, bool(sparse or nbits or lookups), stats)
