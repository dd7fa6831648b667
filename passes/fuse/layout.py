"""Rule ``layout-chains``: a chain of pure data-movement ops (Reshape, Transpose, Squeeze,
Unsqueeze, Flatten, Identity; on FX view/reshape/permute/transpose/clone/...) is replaced by
the cheapest equivalent: nothing (the chain is the identity, e.g. a patch partition followed
by its reverse, or a transpose and its inverse), one Reshape (the chain keeps element order), or
one Transpose (the chain is a single axis permutation).

How: with static shapes, run the chain on ``arange(n)`` of the source shape; the result is the
chain's index map, compared against the identity, a reshape, an axis permutation, and a reshape
followed by one permutation (for chains longer than two ops). This
covers inverse pairs at any distance along the chain and "unfold once": when each layer of a
patch-local stack partitions and reverses around itself, the reverse of one layer and the
partition of the next cancel, leaving one unfold and one fold. Exact: pure rewrites, outputs
bit-identical.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import torch

from effc.passes.fuse._fx import commit
from effc.passes.fuse._onnx import GraphRule, const, initializer, insert, replace, static_shape

ONNX_LAYOUT = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity"}


def _axes(node: ir.Node) -> list[int] | None:
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        axes = const(node.inputs[1])
        return None if axes is None else [int(a) for a in np.atleast_1d(axes)]
    attr = node.attributes.get("axes")
    return list(attr.value) if attr is not None else []


def _apply_onnx(node: ir.Node, arr: np.ndarray) -> np.ndarray | None:
    """``node`` applied to ``arr`` (numpy), or None where its parameters are not constant."""
    op = node.op_type
    if op == "Identity":
        return arr
    if op == "Transpose":
        perm = node.attributes.get("perm")
        return arr.transpose(list(perm.value) if perm is not None else None)
    if op == "Reshape":
        shape = const(node.inputs[1])
        if shape is None:
            return None
        allowzero = node.attributes.get("allowzero")
        dims = [
            arr.shape[i] if d == 0 and not (allowzero and allowzero.value) else int(d)
            for i, d in enumerate(shape)
        ]
        return arr.reshape(dims)
    if op == "Flatten":
        axis = node.attributes.get("axis")
        a = axis.value if axis is not None else 1
        a = a + arr.ndim if a < 0 else a  # 0 <= a <= rank
        return arr.reshape(int(np.prod(arr.shape[:a])), int(np.prod(arr.shape[a:])))

    axes = _axes(node)
    if axes is None:
        return None
    if op == "Squeeze":
        return np.squeeze(arr, axis=tuple(axes) if axes else None)
    out_rank = arr.ndim + len(axes)
    return np.expand_dims(arr, tuple(a % out_rank for a in axes))  # Unsqueeze


def _as_permutation(index: np.ndarray, source: tuple[int, ...]) -> list[int] | None:
    """The perm with ``arange(source).transpose(perm) == index``, if there is one."""
    if index.ndim != len(source):
        return None
    base = np.arange(index.size).reshape(source)
    strides = [s // index.itemsize for s in base.strides]
    perm, used = [], set()
    for i, size in enumerate(index.shape):
        step = (
            int(index[(0,) * i + (1,) + (0,) * (index.ndim - i - 1)] - index.flat[0])
            if size > 1
            else None
        )
        match = [
            j
            for j in range(len(source))
            if j not in used and source[j] == size and (step is None or strides[j] == step)
        ]
        if not match:
            return None
        perm.append(match[0])
        used.add(match[0])
    return perm if np.array_equal(base.transpose(perm), index) else None


def _simplify(chain_length: int, source_shape, index: np.ndarray):
    """('identity' | 'reshape' | 'transpose', arg) for a chain's index map, or None."""
    flat = np.arange(index.size)
    if np.array_equal(index.ravel(), flat):
        if index.shape == tuple(source_shape):
            return ("identity", None)
        return ("reshape", list(index.shape)) if chain_length > 1 else None
    perm = _as_permutation(index, tuple(source_shape)) if chain_length > 1 else None
    if perm is not None:
        return ("transpose", perm)
    if chain_length > 2:  # a reshape then one transpose, if the chain is longer than that
        shape_perm = _as_reshape_transpose(index)
        if shape_perm is not None:
            return ("reshape-transpose", shape_perm)
    return None


def _as_reshape_transpose(index: np.ndarray) -> tuple[list[int], list[int]] | None:
    """(S, perm) with ``arange(n).reshape(S).transpose(perm) == index``, if there are such."""
    if index.ndim > 8:
        return None
    steps = []
    for i, size in enumerate(index.shape):
        unit = (0,) * i + (1,) + (0,) * (index.ndim - i - 1)
        steps.append(int(index[unit] - index.flat[0]) if size > 1 else -1)
    order = sorted(range(index.ndim), key=lambda a: -steps[a])  # source axes, outermost first
    shape = [index.shape[a] for a in order]
    perm = [order.index(a) for a in range(index.ndim)]
    base = np.arange(index.size).reshape(shape)
    return (shape, perm) if np.array_equal(base.transpose(perm), index) else None


def _chain_onnx(end: ir.Node) -> list[ir.Node]:
    chain = [end]
    while True:
        producer = chain[0].inputs[0].producer() if chain[0].inputs[0] is not None else None
        if producer is None or producer.op_type not in ONNX_LAYOUT or producer.domain != "":
            return chain
        chain.insert(0, producer)


def _chain_end_map(end: ir.Node) -> tuple[list[ir.Node], np.ndarray] | None:
    """(the maximal layout chain ending at ``end``, its index map over the source's elements)."""
    chain = _chain_onnx(end)
    shape = static_shape(chain[0].inputs[0])
    if shape is None or np.prod(shape) > 2**24:
        return None
    index = np.arange(int(np.prod(shape))).reshape(shape)
    for n in chain:
        index = _apply_onnx(n, index)
        if index is None:
            return None
    return chain, index


def _fire_onnx(graph: ir.Graph, node: ir.Node) -> bool:
    if node.op_type not in ONNX_LAYOUT or node.domain != "":
        return False
    out = node.outputs[0]
    uses = list(out.uses())
    if uses and not out.is_graph_output() and all(u.node.op_type in ONNX_LAYOUT for u in uses):
        return False  # not the end of its chain: the end will take the whole chain
    found = _chain_end_map(node)
    if found is None:
        return False
    chain, index = found
    source = chain[0].inputs[0]
    plan = _simplify(len(chain), static_shape(source), index)
    if plan is None:
        return False
    kind, arg = plan
    if kind == "identity":
        replace(out, source)
        return True
    if kind in ("reshape", "reshape-transpose"):
        shape = arg if kind == "reshape" else arg[0]
        target = initializer(graph, f"{out.name}_shape", np.array(shape, dtype=np.int64))
        new = insert(graph, node, ir.node("Reshape", [source, target]))
        if kind == "reshape-transpose":
            new = insert(graph, node, ir.node("Transpose", [new], {"perm": arg[1]}))
    else:
        new = insert(graph, node, ir.node("Transpose", [source], {"perm": arg}))
    replace(out, new)
    return True


def layout_onnx() -> GraphRule:
    return GraphRule(_fire_onnx)


aten = torch.ops.aten
FX_LAYOUT = {
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.permute.default,
    aten.transpose.int,
    aten.t.default,
    aten.clone.default,
    aten.alias.default,
    aten.flatten.using_ints,
    aten.unsqueeze.default,
    aten.squeeze.dim,
    aten.squeeze.dims,
}


def _is_layout(node) -> bool:
    return getattr(node, "op", None) == "call_function" and node.target in FX_LAYOUT


def layout_fx(model) -> int:
    """The same rule on the FX graph: chains re-run on an arange tensor."""
    gm = model.graph_module
    fired = 0
    for node in list(gm.graph.nodes):
        if not _is_layout(node) or all(_is_layout(u) for u in node.users):
            continue  # not the end of its chain: the end will take the whole chain
        chain = [node]
        while _is_layout(chain[0].args[0]):
            chain.insert(0, chain[0].args[0])
        val = chain[0].args[0].meta.get("val") if hasattr(chain[0].args[0], "meta") else None
        if val is None or any(not isinstance(d, int) for d in val.shape):
            continue
        index = torch.arange(val.numel()).reshape(val.shape)
        for n in chain:
            index = n.target(index, *n.args[1:], **n.kwargs)
        plan = _simplify(len(chain), tuple(val.shape), index.contiguous().numpy())
        if plan is None:
            continue
        kind, arg = plan
        strict_views = {aten.view.default, aten._unsafe_view.default}
        if kind != "reshape" and any(u.target in strict_views for u in node.users):
            continue  # a strict view of a possibly non-contiguous result could fail
        source = chain[0].args[0]

        if kind == "identity":
            node.replace_all_uses_with(source)
        else:
            with gm.graph.inserting_before(node):
                if kind == "reshape-transpose":
                    shaped = gm.graph.call_function(aten.reshape.default, (source, arg[0]))
                    new = gm.graph.call_function(aten.permute.default, (shaped, arg[1]))
                else:
                    target = aten.reshape.default if kind == "reshape" else aten.permute.default
                    new = gm.graph.call_function(target, (source, arg))
            new.meta["val"] = node.meta.get("val")
            node.replace_all_uses_with(new)
        fired += 1
    return commit(model, gm, fired)


# ---------------------------------------------------------------- unfold once through residuals
def _layout_output(value: ir.Value) -> tuple[list[ir.Node], np.ndarray] | None:
    node = value.producer()
    if node is None or node.op_type not in ONNX_LAYOUT or node.domain != "":
        return None
    return _chain_end_map(node)


def _forward_paths(value: ir.Value) -> list[list[ir.Node]]:
    """The layout-op paths that start at ``value`` (following single consumers)."""
    paths = []
    for use in value.uses():
        node = use.node
        if node.op_type not in ONNX_LAYOUT or node.domain != "" or use.idx != 0:
            continue
        path = [node]
        while True:
            uses = list(path[-1].outputs[0].uses())
            nxt = uses[0].node if len(uses) == 1 else None
            if nxt is None or nxt.op_type not in ONNX_LAYOUT or nxt.domain != "":
                break
            path.append(nxt)
        paths.append(path)
    return paths


def _replay(graph: ir.Graph, chain: list[ir.Node], source: ir.Value, before: ir.Node) -> ir.Value:
    """The ops of ``chain`` again, on ``source``."""
    value = source
    for node in chain:
        attrs = {k: a for k, a in node.attributes.items()}
        value = insert(graph, before, ir.node(node.op_type, [value, *node.inputs[1:]], attrs))
    return value


def _fire_hoist(graph: ir.Graph, add: ir.Node) -> bool:
    """Add(R(a), R(b)) -> R(a + b); Add(x, R(b)) -> R(P(x) + b) where P = R^-1 is a partition
    of x the graph computes anyway. With layout-chains cancelling P(R(.)), a stack of patch-local
    layers whose residual adds sit on the image keeps one unfold and one fold."""
    if add.op_type != "Add" or add.domain != "" or len(add.inputs) != 2:
        return False
    out_shape = static_shape(add.outputs[0])
    if out_shape is None or any(static_shape(v) != out_shape for v in add.inputs):
        return False  # elementwise only: a permutation distributes over a same-shape Add
    maps = [_layout_output(v) for v in add.inputs]
    if all(m is not None for m in maps):
        (ca, ia), (cb, ib) = maps
        src_a, src_b = ca[0].inputs[0], cb[0].inputs[0]
        if static_shape(src_a) == static_shape(src_b) and np.array_equal(ia, ib):
            summed = insert(graph, add, ir.node("Add", [src_a, src_b]))
            replace(add.outputs[0], _replay(graph, ca, summed, add))
            return True
    for i in (0, 1):
        x, r = add.inputs[1 - i], maps[i]
        if r is None or maps[1 - i] is not None:
            continue
        chain_r, index_r = r
        b = chain_r[0].inputs[0]
        found = _inverse_prefix(x, index_r, tuple(static_shape(b)))
        if found is None:
            continue
        part, exact = found  # P(x), in b's element order; exact: already in b's shape
        if not exact:  # (exporters merge the last reshape of P into the next one)
            shape = initializer(graph, f"{add.name or 'add'}_patches", np.array(static_shape(b)))
            part = insert(graph, add, ir.node("Reshape", [part, shape]))
        summed = insert(graph, add, ir.node("Add", [part, b]))
        replace(add.outputs[0], _replay(graph, chain_r, summed, add))
        return True
    return False


def _inverse_prefix(x: ir.Value, index_r: np.ndarray, shape_b: tuple):
    """(value, exact) of a layout path from ``x`` that undoes R (index map ``index_r``): a prefix
    where R then the prefix is the identity on b (exact) or keeps b's element order."""
    fallback = None
    for path in _forward_paths(x):
        composed = index_r  # R then a prefix of the path
        for end in path:
            composed = _apply_onnx(end, composed)
            if composed is None:
                break
            if np.array_equal(composed.ravel(), np.arange(composed.size)):
                if composed.shape == shape_b:
                    return end.outputs[0], True
                fallback = fallback or (end.outputs[0], False)
    return fallback


def hoist_onnx() -> GraphRule:
    return GraphRule(_fire_hoist)
