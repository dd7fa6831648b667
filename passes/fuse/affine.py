"""Rules ``affine`` and ``linear-chain``: fold constant per-channel scales and biases, and
consecutive linear maps, into one Conv / MatMul / Gemm. Exact math (float rounding aside).

``affine`` (y = conv or x @ W; s, c constants broadcast along the channel axis or scalar):
- Mul(y, s) -> weights and bias scaled per output channel; Add(y, c) -> bias += c;
- Mul(x, s) before the op -> weights scaled per input channel (zero padding stays zero);
- Add(x, c) before a Conv without padding -> bias += W c (with padding the border would change);
- Mul(Mul(x, a), b) -> Mul(x, a b) and Add(Add(x, a), b) -> Add(x, a + b).
``linear-chain``: 1x1 conv -> 1x1 conv (stride 1, no padding, one group) and MatMul -> MatMul
with constant 2-D weights -> one op with W2 W1 and bias W2 b1 + b2, also through a Reshape that
only regroups the leading dims (the last dim, the one the maps act on, kept), only where that
does not add FLOPs (a bottleneck C -> r -> C with r < C/2 stays two ops).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from effc.ir.sites import COMPRESSED
from effc.passes.fuse._onnx import (
    GraphRule,
    const,
    initializer,
    insert,
    only_user,
    replace,
    static_shape,
)


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


def channel_vector(c: np.ndarray, rank: int, axis: int, channels: int) -> np.ndarray | None:
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


class LinearOp:
    """A Conv, MatMul or Gemm with constant weights, seen as y = W x + b per channel."""

    def __init__(self, node: ir.Node, weight: np.ndarray, bias: np.ndarray | None, kind: str):
        self.node, self.weight, self.bias, self.kind = node, weight, bias, kind

    @classmethod
    def of(cls, node: ir.Node | None) -> LinearOp | None:
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

    def emit_conv(self, graph, x: ir.Value, out: ir.Value, attrs: dict, before: ir.Node) -> None:
        """A Conv with these weights and ``attrs`` reading ``x``, inserted before ``before``,
        taking over ``out``."""
        name = self.node.name or "conv"
        inputs = [x, initializer(graph, f"{name}_part_w", self.weight)]
        if self.bias is not None:
            inputs.append(initializer(graph, f"{name}_part_b", self.bias))
        replace(out, insert(graph, before, ir.node("Conv", inputs, attributes=attrs)))

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
    lin = LinearOp.of(y.producer())
    if lin is None or only_user(y) is not node or _rank(y) is None:
        return False
    if lin.kind == "matmul" and node.op_type == "Add":
        return False  # matmul-add's job (Gemm), or stays MatMul + Add
    vec = channel_vector(c, _rank(y), lin.channel_axis, lin.out_channels)
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


def _padded(lin: LinearOp) -> bool:
    pads = lin.node.attributes.get("pads")
    auto_pad = lin.node.attributes.get("auto_pad")
    return lin.kind == "conv" and (
        (pads is not None and any(pads.value))
        or (auto_pad is not None and auto_pad.value not in ("NOTSET", "VALID"))
    )


def _fold_before(graph: ir.Graph, node: ir.Node) -> bool:
    """Mul/Add of a constant whose consumers are all linear ops reading it as their data input
    (each gets the factor folded into its own weights)."""
    if node.op_type not in ("Mul", "Add") or node.domain != "":
        return False
    split = _split_const(node)
    out = node.outputs[0]
    uses = list(out.uses())
    if split is None or not uses or out.is_graph_output() or _rank(out) is None:
        return False
    x, c = split
    if _rank(x) != _rank(out):
        return False  # the constant broadcasts x to a higher rank: not a per-channel op
    linears = [LinearOp.of(u.node) if u.idx == 0 else None for u in uses]
    if any(lin is None for lin in linears):
        return False
    vecs = [channel_vector(c, _rank(out), lin.channel_axis, lin.in_channels) for lin in linears]
    if any(v is None for v in vecs):
        return False
    if node.op_type == "Add" and any(_padded(lin) for lin in linears):
        return False  # an offset before a padded conv changes the border
    for lin, vec in zip(linears, vecs):
        if node.op_type == "Mul":
            lin.scale_in(vec)
        else:
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


def _is_pointwise_conv(lin: LinearOp) -> bool:
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
    second = LinearOp.of(node)
    if second is None:
        return False
    mid = node.inputs[0]
    first = LinearOp.of(mid.producer() if mid is not None else None)
    reshape = None
    if first is None and second.kind != "conv":
        reshape = _last_dim_reshape(mid)
        if reshape is not None:
            first = LinearOp.of(reshape.inputs[0].producer())
            if first is not None and (
                first.kind == "conv" or only_user(reshape.inputs[0]) is not reshape
            ):
                first = None
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
    source = first.node.inputs[0]
    if reshape is not None:  # the same reshape of the leading dims, now on the input
        shape = [*static_shape(mid)[:-1], cin]
        target = initializer(
            graph, f"{reshape.name or 'reshape'}_folded_shape", np.array(shape, np.int64)
        )
        source = insert(graph, node, ir.node("Reshape", [source, target]))
    second.emit(graph, source, node.outputs[0])
    return True


def _last_dim_reshape(value: ir.Value | None) -> ir.Node | None:
    """The Reshape producing ``value`` if it only regroups leading dims (last dim kept, static
    shapes): a linear map on the last axis commutes with it."""
    node = value.producer() if value is not None else None
    if node is None or node.op_type != "Reshape" or node.domain != "":
        return None
    before, after = static_shape(node.inputs[0]), static_shape(value)
    if before is None or after is None or not before or not after or before[-1] != after[-1]:
        return None
    return node


def linear_chain_onnx() -> GraphRule:
    return GraphRule(_fire_chain)


def _split_sizes(split: ir.Node, channels: int) -> list[int] | None:
    axis = split.attributes.get("axis")
    if (axis.value if axis is not None else 0) not in (1, -3):
        return None
    if len(split.inputs) > 1 and split.inputs[1] is not None:
        sizes = const(split.inputs[1])
        return None if sizes is None else [int(s) for s in sizes]
    attr = split.attributes.get("split")
    if attr is not None:
        return list(attr.value)
    n = len(split.outputs)
    return [channels // n] * n if channels % n == 0 else None


def _channel_parts(y: ir.Value, channels: int) -> list[tuple[int, int, ir.Value]] | None:
    """(start, stop, value) for each channel range ``y`` is cut into: by one Split(axis=1), or
    by Slices along axis 1 (step 1) that are its only consumers."""
    users = [u.node for u in y.uses()]
    if not users or y.is_graph_output():
        return None
    if len(users) == 1 and users[0].op_type == "Split" and users[0].domain == "":
        sizes = _split_sizes(users[0], channels)
        if sizes is None or sum(sizes) != channels:
            return None
        bounds = np.cumsum([0, *sizes])
        return [(int(a), int(b), v) for a, b, v in zip(bounds, bounds[1:], users[0].outputs)]
    parts = []
    for node in users:
        if node.op_type != "Slice" or node.domain != "" or node.inputs[0] is not y:
            return None
        args = [const(v) if v is not None else None for v in node.inputs[1:]]
        starts, ends = args[0], args[1]
        axes = args[2] if len(args) > 2 and args[2] is not None else np.array([0])
        steps = args[3] if len(args) > 3 and args[3] is not None else np.array([1])
        if starts is None or ends is None or list(axes) not in ([1], [-3]) or list(steps) != [1]:
            return None
        a, b = int(starts[0]), int(min(ends[0], channels))
        if not 0 <= a < b:
            return None
        parts.append((a, b, node.outputs[0]))
    return parts


def _fire_split(graph: ir.Graph, conv_node: ir.Node) -> bool:
    """A Conv whose output is only cut along channels (Split, or Slices) -> one Conv per part:
    a group-1 conv by output rows, a depthwise conv with the cut moved to its input. Exact: the
    same sums per channel, and no copy of the parts."""
    conv = LinearOp.of(conv_node)
    if conv is None or conv.kind != "conv" or conv.weight.ndim != 4:
        return False
    parts = _channel_parts(conv_node.outputs[0], conv.out_channels)
    if parts is None:
        return False
    depthwise = conv.groups == conv.out_channels == conv.in_channels and conv.weight.shape[1] == 1
    if conv.groups != 1 and not depthwise:
        return False
    x = conv_node.inputs[0]
    for a, b, out in parts:
        piece = LinearOp(conv_node, conv.weight[a:b], None, "conv")
        if conv.bias is not None:
            piece.bias = conv.bias.reshape(-1)[a:b]
        attrs = {k: v for k, v in conv_node.attributes.items() if k != "group"}
        source = x
        if depthwise:  # channels a..b of the output read channels a..b of the input
            attrs["group"] = b - a
            name = conv_node.name or "conv"
            starts, ends, axes = (
                initializer(graph, f"{name}_cut", np.array([v], np.int64)) for v in (a, b, 1)
            )
            source = insert(graph, conv_node, ir.node("Slice", [x, starts, ends, axes]))
        piece.emit_conv(graph, source, out, attrs, conv_node)
    return True


def split_conv_onnx() -> GraphRule:
    return GraphRule(_fire_split)
