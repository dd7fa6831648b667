"""Rule ``layout-chains``: a chain of pure data-movement ops (Reshape, Transpose, Squeeze,
Unsqueeze, Flatten, Identity; on FX view/reshape/permute/transpose/clone/...) is replaced by
the cheapest equivalent: nothing (the chain is the identity, e.g. a patch partition followed
by its reverse, or a transpose and its inverse), one Reshape (the chain keeps element order), or
one Transpose (the chain is a single axis permutation).

How: with static shapes, run the chain on ``arange(n)`` of the source shape; the result is the
chain's index map, compared against the identity, a reshape and every axis permutation. This
covers inverse pairs at any distance along the chain and "unfold once": when each layer of a
patch-local stack partitions and reverses around itself, the reverse of one layer and the
partition of the next cancel, leaving one unfold and one fold. Exact: pure rewrites, outputs
bit-identical.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import torch

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
    return ("transpose", perm) if perm is not None else None


def _chain_onnx(end: ir.Node) -> list[ir.Node]:
    chain = [end]
    while True:
        producer = chain[0].inputs[0].producer() if chain[0].inputs[0] is not None else None
        if producer is None or producer.op_type not in ONNX_LAYOUT or producer.domain != "":
            return chain
        chain.insert(0, producer)


def _fire_onnx(graph: ir.Graph, node: ir.Node) -> bool:
    if node.op_type not in ONNX_LAYOUT or node.domain != "":
        return False
    out = node.outputs[0]
    uses = list(out.uses())
    if uses and not out.is_graph_output() and all(u.node.op_type in ONNX_LAYOUT for u in uses):
        return False  # not the end of its chain: the end will take the whole chain
    chain = _chain_onnx(node)
    source = chain[0].inputs[0]
    shape = static_shape(source)
    if shape is None or np.prod(shape) > 2**24:
        return False
    index = np.arange(int(np.prod(shape))).reshape(shape)
    for n in chain:
        index = _apply_onnx(n, index)
        if index is None:
            return False
    plan = _simplify(len(chain), shape, index)
    if plan is None:
        return False
    kind, arg = plan
    if kind == "identity":
        replace(out, source)
        return True
    if kind == "reshape":
        target = initializer(graph, f"{out.name}_shape", np.array(arg, dtype=np.int64))
        new = insert(graph, node, ir.node("Reshape", [source, target]))
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
                target = aten.reshape.default if kind == "reshape" else aten.permute.default

                new = gm.graph.call_function(target, (source, arg))
            new.meta["val"] = node.meta.get("val")
            node.replace_all_uses_with(new)
        fired += 1
    if fired:
        gm.graph.eliminate_dead_code()
        gm.recompile()
        model.graph_module = gm
    return fired
