"""Rule ``channel-linear``: a Linear over the channel axis of a transposed (B, C, L) tensor is a
1x1 convolution on the untransposed one, and the transposes around it cancel.

Conv-attention code writes ``x.view(b, c, -1).transpose(-1, -2)`` -> ``nn.Linear`` (qkv) ->
``chunk`` -> ``.transpose(-1, -2)`` on each part. In ONNX::

    t = Transpose<perm=[0, 2, 1]>(a)            a: (B, C, L)
    m = MatMul(t, W)  [+ Add(m, bias)]          W: (C, N) constant
    parts = Split<axis=-1>(m)  (or m itself)
    y_i = Transpose<perm=[0, 2, 1]>(parts_i)    (B, N_i, L)

becomes ``Conv(a, W^T[:, :, None], bias)`` -> ``Split<axis=1>``, with every ``y_i`` taken from
the Split's outputs: no transpose left, and the weight stays a weight site (a conv). It fires only
when every use of the MatMul's result ends in such a transpose. Exact in real arithmetic: the
same products and sums, accumulated in the conv's order.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from effc.ir.sites import COMPRESSED
from effc.passes.fuse._onnx import GraphRule, const, initializer, insert, replace


def _swaps_last_two(node: ir.Node | None) -> bool:
    if node is None or node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
        return False
    perm = node.attributes.get("perm")
    return perm is not None and list(perm.as_ints()) == [0, 2, 1]


def _uses(value: ir.Value) -> list[ir.Node] | None:
    if value.is_graph_output():
        return None
    return [u.node for u in value.uses()]


def _bias(add: ir.Node, m: ir.Value, n: int) -> np.ndarray | None:
    other = add.inputs[1] if add.inputs[0] is m else add.inputs[0]
    b = const(other)
    if b is None or b.size != n or b.ndim > 3 or (b.ndim > 0 and b.shape[-1] != n):
        return None
    return b.reshape(n)


def _split_parts(split: ir.Node, n: int) -> list[int] | None:
    """The part sizes of a Split along the last axis of an (B, L, n) tensor, else None."""
    axis = split.attributes.get("axis")
    if axis is None or axis.as_int() not in (-1, 2):
        return None
    k = len(split.outputs)
    if len(split.inputs) > 1 and split.inputs[1] is not None:
        sizes = const(split.inputs[1])
        return None if sizes is None else [int(s) for s in sizes]
    attr = split.attributes.get("split")
    if attr is not None:
        return list(attr.as_ints())
    if split.attributes.get("num_outputs") is not None or n % k == 0:
        size = -(-n // k)
        return [size] * (k - 1) + [n - size * (k - 1)]
    return None


def _slice_range(node: ir.Node) -> tuple[int, int] | None:
    """(start, end) of a step-1 Slice along the last axis of an (B, L, n) tensor, else None."""
    params = [const(v) if v is not None else None for v in node.inputs[1:]]
    if len(params) < 3 or any(p is None or p.size != 1 for p in params[:3]):
        return None
    if int(params[2].reshape(-1)[0]) not in (-1, 2):
        return None
    if len(params) > 3 and params[3] is not None and int(params[3].reshape(-1)[0]) != 1:
        return None
    return int(params[0].reshape(-1)[0]), int(params[1].reshape(-1)[0])


def _transposed_uses(value: ir.Value) -> tuple[list[ir.Node], bool] | None:
    """(the transposes back among ``value``'s uses, whether it has other uses), or None if it is
    a graph output."""
    uses = _uses(value)
    if uses is None:
        return None
    backs = [u for u in uses if _swaps_last_two(u)]
    return backs, len(backs) < len(uses)


def _fire(graph: ir.Graph, t: ir.Node) -> bool:
    if not _swaps_last_two(t):
        return False
    a = t.inputs[0]
    users = _uses(t.outputs[0])
    if a is None or a.shape is None or len(a.shape) != 3 or not users or len(users) != 1:
        return False
    mm = users[0]
    if mm.op_type != "MatMul" or mm.inputs[0] is not t.outputs[0]:
        return False
    w = const(mm.inputs[1])
    if w is None or w.ndim != 2 or mm.inputs[1].metadata_props.get(COMPRESSED):
        return False
    c, n = w.shape
    if a.shape[1] != c:
        return False
    out, bias = mm.outputs[0], None
    after = _uses(out)
    if after is not None and len(after) == 1 and after[0].op_type == "Add":
        bias = _bias(after[0], out, n)
        if bias is not None:
            out = after[0].outputs[0]
    # the parts of the result in (B, L, N) layout: the result itself, or its Split/Slice parts
    # along the last axis; each part's transposes back cancel, other uses get one transpose
    whole = _transposed_uses(out)
    if whole is None:
        return False
    parts: list[tuple[ir.Value, object]] = []  # (value, None | ("split", sizes) | ("slice", r))
    direct = [u for u in _uses(out) if not _swaps_last_two(u)]
    if whole[0]:
        parts.append((out, None))
    for user in direct:
        if user.op_type == "Split" and user.inputs[0] is out:
            sizes = _split_parts(user, n)
            if sizes is None or sum(sizes) != n or len(sizes) != len(user.outputs):
                return False
            parts.append((user, ("split", sizes)))
        elif user.op_type == "Slice" and user.inputs[0] is out and _slice_range(user):
            parts.append((user, ("slice", _slice_range(user))))
        else:
            return False
    removed, added = 1, 0
    for part, how in parts:
        values = [out] if how is None else list(part.outputs)
        for v in values:
            uses = _transposed_uses(v)
            if uses is None:
                return False
            removed += len(uses[0])
            added += how is not None and uses[1]
    if added >= removed:
        return False
    weight = initializer(graph, (mm.inputs[1].name or "W") + "_conv", w.T[:, :, None].copy())
    inputs = [a, weight]
    if bias is not None:
        inputs.append(
            initializer(graph, (mm.inputs[1].name or "W") + "_bias", bias.astype(w.dtype))
        )
    conv = ir.Node("", "Conv", inputs, attributes=[ir.AttrInt64s("kernel_shape", [1])])
    y = insert(graph, t, conv)
    y.dtype = a.dtype
    anchor = conv
    for part, how in parts:
        if how is None:
            for back in _transposed_uses(out)[0]:
                replace(back.outputs[0], y)
            continue
        kind, spec = how
        new = _channel_part(graph, y, kind, spec)
        graph.insert_after(anchor, new)
        anchor = new
        for old, value in zip(part.outputs, new.outputs):
            value.dtype = a.dtype
            backs, others = _transposed_uses(old)
            for back in backs:
                replace(back.outputs[0], value)
            if others:  # what used the (B, L, N) part gets it transposed from the conv's layout
                node = ir.Node(
                    "", "Transpose", [value], attributes=[ir.AttrInt64s("perm", [0, 2, 1])]
                )
                graph.insert_after(anchor, node)
                anchor = node
                node.outputs[0].dtype = a.dtype
                old.replace_all_uses_with(node.outputs[0])
    return True


def _channel_part(graph: ir.Graph, y: ir.Value, kind: str, spec) -> ir.Node:
    """A Split (``spec``: sizes) or Slice (``spec``: (start, end)) of ``y``'s channel axis."""
    if kind == "slice":
        params = [np.array([v], np.int64) for v in (*spec, 1)]
        names = ("slice_starts", "slice_ends", "slice_axes")
        inputs = [y] + [initializer(graph, k, v) for k, v in zip(names, params)]
        return ir.Node("", "Slice", inputs)
    attrs = [ir.AttrInt64("axis", 1)]
    if graph.opset_imports.get("", 13) >= 13:
        inputs = [y, initializer(graph, "split_sizes", np.array(spec, np.int64))]
    else:  # sizes as an attribute before opset 13
        inputs = [y]
        attrs.append(ir.AttrInt64s("split", spec))
    return ir.Node("", "Split", inputs, attributes=attrs, num_outputs=len(spec))


def channel_linear_onnx() -> GraphRule:
    return GraphRule(_fire)
