"""Quantized weights stored as their codes in ONNX, for the onnxruntime and TensorRT targets:
``MatMulNBits`` (com.microsoft, onnxruntime's int4/int8 weight-only MatMul),
``GatherBlockQuantized`` (com.microsoft, its embedding lookup of such codes) and
``DequantizeLinear`` with ``block_size`` (opset 21), each holding exactly the codes, scales and
zero points the compression state records (so the graph computes the fake-quantized model)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from effc.ir.compression import SiteState
from effc.ir.sites import embedding_sites
from effc.passes.fuse._onnx import initializer, insert, like, replace

MS_DOMAIN = "com.microsoft"


def stored_codes(state: SiteState) -> np.ndarray:
    """(out, in/g, g) uint8 codes with every pruned group at its zero point (dequantizes to 0)."""
    codes = state.codes.numpy().copy()
    if state.mask is not None:
        pruned = ~state.mask.numpy()
        codes[pruned] = state.zero.numpy()[pruned][:, None]
    return codes


def _pack_nibbles(a: np.ndarray) -> np.ndarray:
    """Pairs along the last axis (even length) -> bytes, the first of each pair in the low nibble."""
    return (a[..., 0::2] | (a[..., 1::2] << 4)).astype(np.uint8)


def nbits_applies(state: SiteState) -> bool:
    """MatMulNBits (and GatherBlockQuantized) take these codes: int4/int8 in groups of a power
    of two >= 16."""
    g = state.group
    return state.bits in (4, 8) and g >= 16 and g & (g - 1) == 0


def matmul_nbits_applies(site, state: SiteState) -> bool:
    # the weight stored (in, out), or (out, in) behind a Transpose (a tied lm_head): the codes
    # are laid out from the (out, in) view either way
    return site.node.op_type == "MatMul" and nbits_applies(state)


def _nbits_arrays(state: SiteState) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes packed (N, K/g, g*bits/8), scales (N, K/g) float32, zero points packed (N, ...))
    as MatMulNBits and GatherBlockQuantized store them (4-bit: two a byte, low nibble first)."""
    codes = stored_codes(state)  # (N, K/g, g)
    n, blocks, g = codes.shape
    zero = state.zero.numpy()
    if state.bits == 4:
        packed = _pack_nibbles(codes)
        if blocks % 2:
            zero = np.concatenate([zero, np.zeros((n, 1), np.uint8)], axis=1)
        zero = _pack_nibbles(zero)
    else:
        packed = codes
    return packed.astype(np.uint8), state.scale.numpy().astype(np.float32), zero.astype(np.uint8)


def quantized_tables(model, sites) -> list[tuple[ir.Value, SiteState, str | None]]:
    """Embedding tables whose values are codes of a quantization record: (table initializer,
    that state, the fqn of the linear site it is tied to or None). A table is tied to a
    quantized linear site holding equal values (a tied lm_head quantized with
    ``embeddings=tied``, or an int4 table quantized like the lm_head), else it has its own
    state (``embeddings=int8|int4``). Only codes the lookup op takes (``nbits_applies``)."""
    found = []
    for table in embedding_sites(model):
        tied = [
            s for s in sites if table.fqn in s.tied_with and model.compression.is_quantized(s.fqn)
        ]
        via = tied[0].fqn if tied else None
        state = model.compression.sites.get(via or table.fqn)
        if state is None or not state.quantized or not nbits_applies(state):
            continue
        found.append((table.handle[0], state, via))
    return found


def gathers_of(table: ir.Value) -> list[ir.Node]:
    return [u.node for u in table.uses() if u.node.op_type == "Gather" and u.idx == 0]


def gather_block_quantized(
    graph: ir.Graph, gather: ir.Node, state: SiteState, shared: tuple | None = None
) -> None:
    """Replace ``Gather(table, ids)`` by ``GatherBlockQuantized(codes, ids, scales, zero points)``
    (com.microsoft): rows dequantized on lookup. ``shared``: the (codes, scales, zero points)
    initializers of a MatMulNBits holding the same weight (a tied lm_head), read through
    Reshapes, so the file stores them once."""
    n, k = state.codes.shape[0], state.codes.shape[1] * state.codes.shape[2]
    name = gather.name or "gather"
    if shared is None:
        packed, scales, zero = _nbits_arrays(state)
        data = initializer(graph, f"{name}.gbq_data", packed.reshape(n, -1))
        s = initializer(graph, f"{name}.gbq_scales", scales)
        z = initializer(graph, f"{name}.gbq_zero_points", zero.reshape(n, -1))
    else:
        b, s, z = shared
        shapes = [np.array([n, -1], np.int64)] * 2
        data, z = (
            insert(graph, gather, ir.node("Reshape", [v, initializer(graph, f"{name}.rows", sh)]))
            for v, sh in zip((b, z), shapes)
        )
    attrs = {"gather_axis": 0, "quantize_axis": 1, "block_size": state.group, "bits": state.bits}
    new = ir.node(
        "GatherBlockQuantized",
        [data, gather.inputs[1], s, z],
        attrs,
        domain=MS_DOMAIN,
        name=f"{name}.gbq",
    )
    out = insert(graph, gather, new)
    out.dtype = ir.DataType.FLOAT
    assert k == state.codes.shape[1] * state.group
    replace(gather.outputs[0], out)
    graph.remove(gather, safe=True)


def nbits_node(
    graph: ir.Graph, x: ir.Value, state: SiteState, base: str, accuracy_level: int
) -> tuple[ir.Node, tuple]:
    """``MatMulNBits(x, B, scales, zero_points)`` computing x Wᵀ of the state's codes (not yet
    inserted), and its (B, scales, zero points) initializers: B (N, K/g, g*bits/8) the codes of
    the (out = N, in = K) view packed per block (4-bit: two a byte, low nibble first), scales
    (N, K/g) float32, zero points (4-bit: two a byte along the blocks)."""
    packed, scales, zero = _nbits_arrays(state)
    n, blocks = scales.shape
    b = initializer(graph, f"{base}.nbits_weight", packed)
    s = initializer(graph, f"{base}.nbits_scales", scales)
    z = initializer(graph, f"{base}.nbits_zero_points", zero.reshape(-1))
    attrs = {
        "K": blocks * state.group,
        "N": n,
        "bits": state.bits,
        "block_size": state.group,
        "accuracy_level": accuracy_level,
    }
    node = ir.node("MatMulNBits", [x, b, s, z], attrs, domain=MS_DOMAIN, name=f"{base}.nbits")
    node.outputs[0].dtype = ir.DataType.FLOAT
    return node, (b, s, z)


def matmul_nbits(graph: ir.Graph, site, state: SiteState, accuracy_level: int) -> tuple:
    """Replace the site's ``MatMul(x, W)`` by ``nbits_node``; returns its initializers."""
    node = site.node
    new, arrays = nbits_node(graph, node.inputs[0], state, site.fqn, accuracy_level)
    out = insert(graph, node, new)
    out.shape, out.dtype = node.outputs[0].shape, ir.DataType.FLOAT
    replace(node.outputs[0], out)
    graph.remove(node, safe=True)
    return arrays


def block_dequantize(graph: ir.Graph, site, state: SiteState) -> bool:
    """Replace the site's fp32 weight by codes + DequantizeLinear(block_size) in its layout."""
    value, transposed = site.handle
    codes = stored_codes(state).reshape(site.shape[0], -1)  # (out, in) codes
    scale = state.scale.numpy().astype(np.float32)  # (out, in / g)
    zero = state.zero.numpy()
    group, bits = state.group, state.bits
    if transposed:  # stored (in, out): blocks run along axis 0
        codes, scale, zero, axis = codes.T, scale.T, zero.T, 0
    else:
        axis = 1
    dtype = ir.DataType.UINT4 if bits == 4 else ir.DataType.UINT8
    np_dtype = dtype.numpy()
    base = value.name
    cv = initializer(graph, f"{base}_codes", codes.astype(np.uint8).astype(np_dtype))
    sv = initializer(graph, f"{base}_block_scale", np.ascontiguousarray(scale))
    zv = initializer(graph, f"{base}_block_zero", zero.astype(np.uint8).astype(np_dtype))
    consumers = list(value.uses())
    # its inputs are initializers: placed first, it precedes every consumer
    dq = insert(
        graph,
        next(iter(graph)),
        ir.node("DequantizeLinear", [cv, sv, zv], {"axis": axis, "block_size": group}),
    )
    like(dq, value)
    for use in consumers:
        use.node.replace_input_with(use.idx, dq)
    return True
