"""Rules ``affine`` and ``linear-chain``: fold constant per-channel scales and biases, and
consecutive linear maps, into one Conv / MatMul / Gemm. Exact math (float rounding aside).

``affine`` (y = conv or x @ W; s, c constants broadcast along the channel axis or scalar):
- Mul(y, s) -> weights and bias scaled per output channel; Add(y, c) -> bias += c;
- Mul(x, s) before the op -> weights scaled per input channel (zero padding stays zero);
- Add(x, c) before a Conv without padding -> bias += W c (with padding the border would change);
- Mul(Mul(x, a), b) -> Mul(x, a b) and Add(Add(x, a), b) -> Add(x, a + b).
``linear-chain``: 1x1 conv -> 1x1 conv (stride 1, no padding, one group) and MatMul -> MatMul
with constant 2-D weights -> one op with W2 W1 and bias W2 b1 + b2, only where that does not
add FLOPs (a bottleneck C -> r -> C with r < C/2 stays two ops).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from effc.passes.fuse._onnx import GraphRule, const, initializer, insert, only_user, replace


def _split_const(node: ir.Node) -> tuple[ir.Value, np.ndarray] | None:
    """(the non-constant input, the constant) of a binary Mul/Add with one constant input."""
    if len(node.inputs) != 2:
        return None
    a, b = node.inputs
    ca, cb = const(a), const(b)
    if cb is not None and ca is None:
        return a, cb
    if ca is not None and cb is None:
        return b, ca
    return None


def _channel_vector(c: np.ndarray, rank: int, axis: int, channels: int) -> np.ndarray | None:
    """``c`` as a length-``channels`` vector if it broadcasts along ``axis`` of a rank-``rank``
    tensor only (or is a scalar), else None."""
    if c.size == 1:
        return np.full(channels, c.reshape(()), dtype=c.dtype)
    if c.ndim > rank:
        return None
    shape = (1,) * (rank - c.ndim) + c.shape
    pos = axis % rank
    if shape[pos] != channels or any(d != 1 for i, d in enumerate(shape) if i != pos):
        return None
    return c.reshape(channels)


class _Linear:
    """A Conv, MatMul or Gemm with constant weights, seen as y = W x + b per channel."""

    def __init__(self, node: ir.Node, weight: np.ndarray, bias: np.ndarray | None, kind: str):
        self.node, self.weight, self.bias, self.kind = node, weight, bias, kind

    @classmethod
    def of(cls, node: ir.Node | None) -> _Linear | None:
        from effc.ir.sites import COMPRESSED

        if node is None or node.domain != "" or len(node.inputs) < 2 or node.inputs[1] is None:
            return None
        if node.inputs[1].metadata_props.get(COMPRESSED):
            return None  # folding would move a compressed weight off its grid

        if node.op_type == "Conv":
            w = const(node.inputs[1])
            b = const(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] else None
            if w is None or (len(node.inputs) > 2 and node.inputs[2] is not None and b is None):
                return None
            return cls(node, w, b, "conv")
        if node.op_type == "MatMul":
            w = const(node.inputs[1])
            return cls(node, w, None, "matmul") if w is not None and w.ndim == 2 else None
        if node.op_type == "Gemm":
            attrs = {k: a.value for k, a in node.attributes.items()}
            if (
                attrs.get("transA", 0)
                or attrs.get("alpha", 1.0) != 1.0
                or attrs.get("beta", 1.0) != 1.0
            ):
                return None
            w = const(node.inputs[1])
            b = const(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] else None
            if w is None or (len(node.inputs) > 2 and node.inputs[2] is not None and b is None):
                return None
            w = w.T if attrs.get("transB", 0) else w
            return cls(node, w, b, "gemm")
        return None

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0] if self.kind == "conv" else self.weight.shape[1]

    @property
    def in_channels(self) -> int:
        if self.kind == "conv":
            return self.weight.shape[1] * self.groups
        return self.weight.shape[0]

    @property
    def groups(self) -> int:
        g = self.node.attributes.get("group")
        return int(g.value) if g is not None else 1

    @property
    def channel_axis(self) -> int:
        return 1 if self.kind == "conv" else -1

    def scale_out(self, s: np.ndarray) -> None:
        if self.kind == "conv":
            self.weight = self.weight * s.reshape(-1, *([1] * (self.weight.ndim - 1)))
        else:
            self.weight = self.weight * s[None, :]
        if self.bias is not None:
            self.bias = self.bias.reshape(-1) * s

    def scale_in(self, s: np.ndarray) -> None:
        if self.kind == "conv":
            per_group = self.weight.shape[1]
            out_per_group = self.weight.shape[0] // self.groups
            # output channel o reads input channels g*per_group .. : g = o // out_per_group
            idx = (np.arange(self.weight.shape[0])[:, None] // out_per_group) * per_group
            factors = s[idx + np.arange(per_group)[None, :]]
            self.weight = self.weight * factors.reshape(
                *factors.shape, *([1] * (self.weight.ndim - 2))
            )
        else:
            self.weight = self.weight * s[:, None]

    def shift_in(self, c: np.ndarray) -> None:
        """Fold an input offset: b += W c."""
        if self.kind == "conv":
            per_group = self.weight.shape[1]
            out_per_group = self.weight.shape[0] // self.groups
            idx = (np.arange(self.weight.shape[0])[:, None] // out_per_group) * per_group
            cin = c[idx + np.arange(per_group)[None, :]]
            delta = (self.weight.sum(axis=tuple(range(2, self.weight.ndim))) * cin).sum(axis=1)
        else:
            delta = c @ self.weight
        self.add_bias(delta)

    def add_bias(self, c: np.ndarray) -> None:
        self.bias = c.astype(self.weight.dtype) if self.bias is None else self.bias.reshape(-1) + c

    def emit(self, graph: ir.Graph, x: ir.Value, out: ir.Value) -> None:
        """Write the op with the new weights in place of ``self.node``, taking over ``out``."""
        name = self.node.name or self.node.op_type
        w = self.weight.astype(np.float32) if self.weight.dtype == np.float64 else self.weight
        wv = initializer(graph, f"{name}_folded_w", w.T if self.kind == "gemm" else w)
        if self.kind == "conv":
            inputs = [x, wv]
            if self.bias is not None:
                inputs.append(initializer(graph, f"{name}_folded_b", self.bias.astype(w.dtype)))
            attrs = {k: a for k, a in self.node.attributes.items()}
            new = ir.node("Conv", inputs, attributes=attrs)
        elif self.bias is None:
            new = ir.node("MatMul", [x, wv])
        elif self.kind == "gemm":
            bv = initializer(graph, f"{name}_folded_b", self.bias.astype(w.dtype))
            new = ir.node("Gemm", [x, wv, bv], {"transB": 1})
        else:
            mm = insert(graph, self.node, ir.node("MatMul", [x, wv]))
            bv = initializer(graph, f"{name}_folded_b", self.bias.astype(w.dtype))
            new = ir.node("Add", [mm, bv])
        result = insert(graph, self.node, new)
        replace(out, result)


def _rank(value: ir.Value) -> int | None:
    return len(value.shape) if value.shape is not None else None


def _fold_after(graph: ir.Graph, node: ir.Node) -> bool:
    """Mul/Add of a constant after a linear op whose output has no other use."""
    if node.op_type not in ("Mul", "Add") or node.domain != "":
        return False
    split = _split_const(node)
    if split is None:
        return False
    y, c = split
    lin = _Linear.of(y.producer())
    if lin is None or only_user(y) is not node or _rank(y) is None:
        return False
    if lin.kind == "matmul" and node.op_type == "Add":
        return False  # matmul-add's job (Gemm), or stays MatMul + Add
    vec = _channel_vector(c, _rank(y), lin.channel_axis, lin.out_channels)
    if vec is None:
        return False
    if node.op_type == "Mul":
        if lin.bias is not None and lin.bias.size != vec.size:
            return False
        lin.scale_out(vec)
    else:
        lin.add_bias(vec)
    lin.emit(graph, lin.node.inputs[0], node.outputs[0])
    return True


def _fold_before(graph: ir.Graph, node: ir.Node) -> bool:
    """Mul/Add of a constant whose only consumer is a linear op (as its data input)."""
    if node.op_type not in ("Mul", "Add") or node.domain != "":
        return False
    split = _split_const(node)
    out = node.outputs[0]
    user = only_user(out)
    lin = _Linear.of(user)
    if split is None or lin is None or lin.node.inputs[0] is not out or _rank(out) is None:
        return False
    x, c = split
    if _rank(x) != _rank(out):
        return False  # the constant broadcasts x to a higher rank: not a per-channel op
    vec = _channel_vector(c, _rank(out), lin.channel_axis, lin.in_channels)
    if vec is None:
        return False
    if node.op_type == "Mul":
        lin.scale_in(vec)
    else:
        pads = lin.node.attributes.get("pads")
        auto_pad = lin.node.attributes.get("auto_pad")
        if lin.kind == "conv" and (
            (pads is not None and any(pads.value))
            or (auto_pad is not None and auto_pad.value not in ("NOTSET", "VALID"))
        ):
            return False  # an offset before a padded conv changes the border
        lin.shift_in(vec)
    lin.emit(graph, x, lin.node.outputs[0])
    return True


def _merge_constants(graph: ir.Graph, node: ir.Node) -> bool:
    """Mul(Mul(x, a), b) -> Mul(x, a*b); Add(Add(x, a), b) -> Add(x, a+b)."""
    if node.op_type not in ("Mul", "Add") or node.domain != "":
        return False
    outer = _split_const(node)
    if outer is None:
        return False
    inner_out, b = outer
    inner = inner_out.producer()
    if inner is None or inner.op_type != node.op_type or only_user(inner_out) is not node:
        return False
    split = _split_const(inner)
    if split is None:
        return False
    x, a = split
    merged = a * b if node.op_type == "Mul" else a + b
    if merged.shape != np.broadcast_shapes(a.shape, b.shape) or merged.dtype != a.dtype:
        return False
    cv = initializer(graph, f"{node.name or node.op_type}_merged", merged)
    new = insert(graph, node, ir.node(node.op_type, [x, cv]))
    replace(node.outputs[0], new)
    return True


def _fire_affine(graph: ir.Graph, node: ir.Node) -> bool:
    return _merge_constants(graph, node) or _fold_after(graph, node) or _fold_before(graph, node)


def affine_onnx() -> GraphRule:
    return GraphRule(_fire_affine)


def _is_pointwise_conv(lin: _Linear) -> bool:
    attrs = {k: a.value for k, a in lin.node.attributes.items()}
    return (
        lin.weight.ndim == 4
        and lin.weight.shape[2:] == (1, 1)
        and lin.groups == 1
        and not any(attrs.get("pads", []) or [])
        and all(s == 1 for s in attrs.get("strides", [1, 1]))
        and attrs.get("auto_pad", "NOTSET") in ("NOTSET", "VALID")
    )


def _fire_chain(graph: ir.Graph, node: ir.Node) -> bool:
    second = _Linear.of(node)
    if second is None:
        return False
    mid = node.inputs[0]
    first = _Linear.of(mid.producer() if mid is not None else None)
    if first is None or only_user(mid) is not node:
        return False
    if first.kind == "conv" and second.kind == "conv":
        if not (_is_pointwise_conv(first) and _is_pointwise_conv(second)):
            return False
        w1, w2 = first.weight[:, :, 0, 0], second.weight[:, :, 0, 0]
        cin, cmid, cout = w1.shape[1], w1.shape[0], w2.shape[0]
    elif first.kind != "conv" and second.kind != "conv":
        w1, w2 = first.weight.T, second.weight.T  # as (out, in)
        cin, cmid, cout = w1.shape[1], w1.shape[0], w2.shape[0]
    else:
        return False
    if cin * cout > cin * cmid + cmid * cout:
        return False  # folding a bottleneck would add FLOPs
    w = (w2.astype(np.float64) @ w1.astype(np.float64)).astype(w1.dtype)
    b1 = first.bias.reshape(-1) if first.bias is not None else None
    b2 = second.bias.reshape(-1) if second.bias is not None else None
    bias = None
    if b1 is not None or b2 is not None:
        bias = np.zeros(cout, dtype=np.float64)
        if b1 is not None:
            bias += w2.astype(np.float64) @ b1
        if b2 is not None:
            bias += b2
        bias = bias.astype(w1.dtype)
    if second.kind == "conv":
        second.weight, second.bias = w[:, :, None, None], bias
    else:
        second.weight, second.bias = w.T, bias
        second.kind = "gemm" if bias is not None and second.kind == "gemm" else second.kind
    second.emit(graph, first.node.inputs[0], node.outputs[0])
    return True


def linear_chain_onnx() -> GraphRule:
    return GraphRule(_fire_chain)
