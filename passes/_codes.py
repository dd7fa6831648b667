"""Quantized weights stored as their codes in ONNX, for the onnxruntime and TensorRT targets:
``MatMulNBits`` (com.microsoft, onnxruntime's int4/int8 weight-only MatMul) and
``DequantizeLinear`` with ``block_size`` (opset 21), each holding exactly the codes, scales and
zero points the compression state records (so the graph computes the fake-quantized model)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from effc.ir.compression import SiteState
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


def matmul_nbits_applies(site, state: SiteState) -> bool:
    g = state.group
    return (
        site.node.op_type == "MatMul"
        and state.bits in (4, 8)
        and g >= 16
        and g & (g - 1) == 0
        and site.handle[1]  # a MatMul weight stored (in, out)
    )


def matmul_nbits(graph: ir.Graph, site, state: SiteState, accuracy_level: int) -> None:
    """Replace ``MatMul(x, W)`` by ``MatMulNBits(x, B, scales, zero_points)``: B (N, K/g, g*bits/8)
    the codes of W's (out = N, in = K) view packed per block (4-bit: two a byte, low nibble
    first), scales (N, K/g) float32, zero points (4-bit: two a byte along the blocks)."""
    node = site.node
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
    base = site.fqn
    b = initializer(graph, f"{base}.nbits_weight", packed.astype(np.uint8))
    s = initializer(graph, f"{base}.nbits_scales", state.scale.numpy().astype(np.float32))
    z = initializer(graph, f"{base}.nbits_zero_points", zero.astype(np.uint8).reshape(-1))
    attrs = {
        "K": blocks * g,
        "N": n,
        "bits": state.bits,
        "block_size": g,
        "accuracy_level": accuracy_level,
    }
    new = ir.node(
        "MatMulNBits", [node.inputs[0], b, s, z], attrs, domain=MS_DOMAIN, name=f"{base}.nbits"
    )
    out = insert(graph, node, new)
    out.shape, out.dtype = node.outputs[0].shape, ir.DataType.FLOAT
    replace(node.outputs[0], out)
    graph.remove(node, safe=True)


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
