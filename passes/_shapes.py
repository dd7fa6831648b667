"""Shape-computation chains on graphs with dynamic dims (a step of ``cleanup``).

Exported graphs compute shapes at run time: ``Shape -> Gather -> Unsqueeze -> Concat -> Reshape``,
``ConstantOfShape`` for recurrent initial states. Constant folding gives up on them as soon as one
dim is symbolic, although most of their elements are static. Here each small int tensor computed
from ``Shape`` is tracked as a tuple of elements, each an int or a symbol (a named dim, or an
unnamed dim of one value's shape), through Gather/Slice/Concat/Unsqueeze/Squeeze/Cast/Identity
and scalar arithmetic. Then:

- a tracked value whose elements are all ints becomes an initializer;
- a ``Reshape`` whose target has symbols gets a constant target: a symbol equal to the input's
  dim at the same position becomes 0 (copy), and one remaining symbol becomes -1 (inferred);
- a Slice whose users are all Slices of other axes merges into each of them (one Slice each);
- ``Unsqueeze(Squeeze(x, axes), axes)`` is ``x``; ``Unsqueeze(Unsqueeze(x, a), b)`` is one
  Unsqueeze; (dims of size 1 removed and put back);
- a ``Transpose`` that only moves axes of size 1 is a ``Reshape`` (no copy; e.g. an LSTM's
  [T, dirs, 1, H] output moved to [T, 1, dirs, H]);
- ``x + 0``, ``x - 0``, ``x * 1``, ``x / 1`` (a constant of zeros or ones that does not
  broadcast ``x`` to a larger shape) are ``x`` (freshly initialised biases and norm weights);
(An all-zero LSTM initial state is kept, not dropped as the operator's default would allow:
onnxruntime's LSTM runs 12% slower without one, measured on a CRNN; where its shape is static it
folds to a constant.)

Every rewrite is exact (the same tensor at run time for any value of the symbols, non-empty
tensors assumed for the -1 rule).
"""

from __future__ import annotations

import itertools
import logging
import re

import numpy as np
import onnx_ir as ir

from effc.passes.fuse._onnx import initializer

Element = int | tuple
Tracked = tuple[tuple[Element, ...], bool, type]  # (elements, is_scalar, numpy int type)

_INT_TYPES = {ir.DataType.INT64: np.int64, ir.DataType.INT32: np.int32}
_MAX_ELEMENTS = 64  # a shape vector, not data


_SYMBOLIC_MAX_BYTES = 1 << 29  # models above this skip onnxruntime's symbolic inference


def _infer(proto, auto_merge: bool):
    """onnxruntime's symbolic shape inference, run as its ``infer_shapes`` runs it but without
    its habit of writing a model file into the current folder when it cannot finish.
    Returns (model with value_info, complete, the symbols it merged)."""
    from onnxruntime.tools import symbolic_shape_infer
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    inference = SymbolicShapeInference(2**31 - 1, auto_merge, False, 0)
    log = logging.getLogger(symbolic_shape_infer.__name__)
    level = log.level
    log.setLevel(logging.ERROR)  # its "unsupported broadcast" warnings are ours to handle
    try:
        inference._preprocess(proto)
        complete = False
        while inference.run_:
            complete = inference._infer_impl()
        inference._update_output_from_vi()
    finally:
        log.setLevel(level)
    merged = set()
    for a, b in inference.suggested_merge_.items():
        if not _min_of(str(a), str(b)) and not _min_of(str(b), str(a)):
            merged |= {str(a), str(b)}
    return inference.out_mp_, complete, merged


def _min_of(a: str, b: str) -> bool:
    """``a`` is ``Min(c, b)`` with a constant c >= 1: a slice of a fixed table to a length b (the
    position ids of BERT- and GPT-style exports). Merging it with b is sound: where the model
    runs at all, b <= c, so a == b, and a is 1 exactly when b is."""
    m = re.fullmatch(r"Min\((\d+), (.+)\)|Min\((.+), (\d+)\)", a)
    if m is None:
        return False
    c, other = (m.group(1), m.group(2)) if m.group(1) else (m.group(4), m.group(3))
    return int(c) >= 1 and other == b


def _symbolic_dims(model: ir.Model) -> dict[str, list]:
    """Value name -> dims (int, or a string naming a symbolic expression) from onnxruntime's
    symbolic shape inference, which names a dim by its expression in the inputs' dims, so
    equal dims get equal names across Reshape, MatMul and the like.

    First without merging; where that cannot finish (two symbols broadcast against each other),
    with merging, and then every dim that mentions a merged symbol is left out: merging assumes
    the two are equal, and one may be a broadcast 1 at run time (BERT's ``Min(512, seq)``
    against ``seq`` is the sound exception, see ``_min_of``). Empty where the inference fails."""
    import onnx

    size = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value)
    if size > _SYMBOLIC_MAX_BYTES:
        return {}
    try:
        proto = ir.serde.serialize_model(model)
        inferred, complete, merged = _infer(proto, auto_merge=False)
        if not complete:
            inferred, complete, merged = _infer(proto, auto_merge=True)
    except Exception:  # its own failures on ops it does not know: no extra knowledge
        return {}
    untrusted = [re.compile(r"(?<![\w.])" + re.escape(m) + r"(?![\w.])") for m in merged]

    def dim(d):
        if d.HasField("dim_value"):
            return d.dim_value
        name = d.dim_param
        return None if not name or any(u.search(name) for u in untrusted) else name

    dims: dict[str, list] = {}
    stack = [inferred.graph]
    while stack:
        graph = stack.pop()
        for info in list(graph.value_info) + list(graph.output):
            t = info.type.tensor_type
            if t.HasField("shape"):
                dims[info.name] = [dim(d) for d in t.shape.dim]
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    stack.append(attr.g)
    return dims


def _ints(value: ir.Value | None) -> list[int] | None:
    """A small int constant's elements."""
    if value is None or value.const_value is None:
        return None
    if value.const_value.dtype not in _INT_TYPES:
        return None
    array = value.const_value.numpy()
    if array.size > _MAX_ELEMENTS:
        return None
    return [int(x) for x in array.reshape(-1)]


def _attr_ints(node: ir.Node, name: str) -> list[int] | None:
    attr = node.attributes.get(name)
    return None if attr is None else list(attr.as_ints())


def _arith(op: str, a: Element, b: Element) -> Element:
    if isinstance(a, int) and isinstance(b, int):
        if op == "Add":
            return a + b
        if op == "Sub":
            return a - b
        if op == "Mul":
            return a * b
        if b != 0:
            q = abs(a) // abs(b)  # integer Div truncates toward zero
            return q if (a < 0) == (b < 0) else -q
    if op == "Mul" and b == 1 or op in ("Add", "Sub") and b == 0 or op == "Div" and b == 1:
        return a
    if op == "Mul" and a == 1 or op == "Add" and a == 0:
        return b
    if op in ("Add", "Mul") and not isinstance(a, int) and not isinstance(b, int):
        a, b = sorted((a, b), key=repr)  # commutative: one symbol for a*b and b*a
    return (op, a, b)


def _pairs(a: tuple, b: tuple) -> list[tuple] | None:
    """Elementwise pairs of two 1-D values, broadcasting a length-1 side."""
    if len(a) != len(b):
        if len(b) == 1:
            b = b * len(a)
        elif len(a) == 1:
            a = a * len(b)
        else:
            return None
    return list(zip(a, b))


def _non_negative(e: Element) -> bool:
    if isinstance(e, int):
        return e >= 0
    if e[0] in ("dim", "anon"):  # a tensor's dim
        return True
    return e[0] in ("Add", "Mul") and _non_negative(e[1]) and _non_negative(e[2])


def _equal(a: Element, b: Element) -> bool | None:
    """a == b where it is decided: both ints, or a dim (never negative) against a negative."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    if a == b:
        return True
    for x, y in ((a, b), (b, a)):
        if isinstance(y, int) and y < 0 and _non_negative(x):
            return False
    return None


class _Tracker:
    def __init__(self, symbolic: dict[str, list]) -> None:
        self.values: dict[ir.Value, Tracked] = {}
        self.symbolic = symbolic

    def dim(self, value: ir.Value, axis: int) -> Element:
        """Dim ``axis`` of ``value``: an int, or a symbol equal for equal dims."""
        d = value.shape[axis]
        if isinstance(d, int):
            return d
        known = self.symbolic.get(value.name or "")
        if known is not None and len(known) == len(value.shape) and known[axis] is not None:
            return known[axis] if isinstance(known[axis], int) else ("dim", known[axis])
        name = getattr(d, "value", None)
        return ("dim", name) if name else ("anon", id(value), axis)

    def get(self, value: ir.Value | None) -> Tracked | None:
        if value is None:
            return None
        if value in self.values:
            return self.values[value]
        ints = _ints(value)
        if ints is None:
            return None
        scalar = len(value.const_value.shape) == 0
        return tuple(ints), scalar, _INT_TYPES[value.const_value.dtype]

    def visit(self, node: ir.Node) -> None:
        if node.domain not in ("", "ai.onnx") or len(node.outputs) != 1:
            return
        out = self._eval(node)
        if out is not None and len(out[0]) <= _MAX_ELEMENTS:
            self.values[node.outputs[0]] = out

    def _eval(self, node: ir.Node) -> Tracked | None:
        op = node.op_type
        if op == "Shape":
            x = node.inputs[0]
            if x is None or x.shape is None:
                return None
            rank = len(x.shape)
            start = node.attributes.get("start")
            end = node.attributes.get("end")
            s = start.as_int() if start is not None else 0
            e = end.as_int() if end is not None else rank
            s, e = (min(max(v + rank if v < 0 else v, 0), rank) for v in (s, e))
            return tuple(self.dim(x, i) for i in range(s, e)), False, np.int64
        args = [self.get(v) for v in node.inputs]
        first = args[0] if args else None
        if first is None:
            return None
        elems, scalar, dtype = first
        if op == "Identity":
            return first
        if op == "Cast":
            to = ir.DataType(node.attributes["to"].as_int())
            return (elems, scalar, _INT_TYPES[to]) if to in _INT_TYPES else None
        if op == "Gather":
            axis = node.attributes.get("axis")
            if (axis.as_int() if axis is not None else 0) != 0 or scalar:
                return None
            idx = self.get(node.inputs[1])
            if idx is None or not all(isinstance(i, int) for i in idx[0]):
                return None
            try:
                picked = tuple(elems[i] for i in idx[0])
            except IndexError:
                return None
            return picked, idx[1], dtype
        if op == "Unsqueeze":
            return (elems, False, dtype) if scalar else None
        if op == "Squeeze":
            return (elems, True, dtype) if not scalar and len(elems) == 1 else None
        if op == "Concat":
            if any(a is None or a[1] for a in args):
                return None
            return tuple(itertools.chain.from_iterable(a[0] for a in args)), False, dtype
        if op == "Slice":
            return self._slice(node, elems, scalar, dtype)
        if op == "Equal" and len(args) == 2 and args[1] is not None:
            pairs = _pairs(elems, args[1][0])
            if pairs is None:
                return None
            equal = [_equal(x, y) for x, y in pairs]
            if any(e is None for e in equal):
                return None
            return tuple(equal), scalar and args[1][1], np.bool_
        if op == "Where" and len(args) == 3 and all(a is not None for a in args):
            n = max(len(a[0]) for a in args)
            if any(len(a[0]) not in (1, n) or a[1] for a in args):
                return None
            cond, a, b = (a[0] * n if len(a[0]) == 1 else a[0] for a in args)
            if not all(isinstance(c, bool) for c in cond):
                return None
            return tuple(x if c else y for c, x, y in zip(cond, a, b)), False, args[1][2]
        if op in ("Add", "Sub", "Mul", "Div") and len(args) == 2 and args[1] is not None:
            pairs = _pairs(elems, args[1][0])
            if pairs is None:
                return None
            return tuple(_arith(op, x, y) for x, y in pairs), scalar and args[1][1], dtype
        return None

    def _slice(self, node: ir.Node, elems, scalar, dtype) -> Tracked | None:
        if scalar:
            return None
        starts, ends = (self.get(v) for v in node.inputs[1:3])
        axes = self.get(node.inputs[3]) if len(node.inputs) > 3 else None
        steps = self.get(node.inputs[4]) if len(node.inputs) > 4 else None
        parts = [starts, ends] + [p for p in (axes, steps) if p is not None]
        if starts is None or ends is None or any(len(p[0]) != 1 for p in parts):
            return None
        if any(not isinstance(p[0][0], int) for p in parts):
            return None
        if axes is not None and axes[0][0] not in (0, -1):
            return None
        step = steps[0][0] if steps is not None else 1
        if step == 0:
            return None
        # Python's slice clamps starts and ends as ONNX's Slice does
        return tuple(elems[slice(starts[0][0], ends[0][0], step)]), False, dtype


def _constant(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    return initializer(graph, f"{name}_folded", array)


def _reshape_target(node: ir.Node, tracked: Tracked, tracker: _Tracker) -> list[int] | None:
    allowzero = node.attributes.get("allowzero")
    if allowzero is not None and allowzero.as_int():
        return None
    x = node.inputs[0]
    target: list[Element] = list(tracked[0])
    for i, t in enumerate(target):
        if not isinstance(t, int) and x is not None and x.shape is not None and i < len(x.shape):
            if tracker.dim(x, i) == t:
                target[i] = 0
    unknown = [i for i, t in enumerate(target) if not isinstance(t, int)]
    if not unknown:
        return target
    if len(unknown) > 1 or any(isinstance(t, int) and t < 0 for t in target):
        return None  # more than one dim to infer
    target[unknown[0]] = -1
    return target


def _squeeze_axes(node: ir.Node, rank: int | None) -> list[int] | None:
    """The sorted, non-negative axes of a Squeeze/Unsqueeze; ``rank``: the rank they refer to."""
    if len(node.inputs) > 1:
        axes = _ints(node.inputs[1])
    else:
        axes = _attr_ints(node, "axes")
    if not axes:  # a Squeeze without axes removes every size-1 dim: unknown here
        return None
    if any(a < 0 for a in axes):
        if rank is None:
            return None
        axes = [a + rank if a < 0 else a for a in axes]
    return sorted(axes)


def _unsqueeze_of_squeeze(node: ir.Node) -> ir.Value | None:
    """``x`` where ``node`` is Unsqueeze(Squeeze(x, axes), axes), else None."""
    squeeze = node.inputs[0].producer() if node.inputs and node.inputs[0] is not None else None
    if squeeze is None or squeeze.op_type != "Squeeze" or squeeze.domain not in ("", "ai.onnx"):
        return None
    x = squeeze.inputs[0]
    rank = len(x.shape) if x is not None and x.shape is not None else None
    a = _squeeze_axes(squeeze, rank)
    b = _squeeze_axes(node, rank)
    return x if a is not None and a == b else None


def _slice_params(node: ir.Node) -> list[list[int]] | None:
    """[starts, ends, axes, steps] of an opset-10+ Slice with constant parameters (axes
    non-negative, or made so from the input's rank), else None."""
    if node.op_type != "Slice" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 3:
        return None
    starts, ends = _ints(node.inputs[1]), _ints(node.inputs[2])
    if starts is None or ends is None or len(starts) != len(ends):
        return None
    axes = _ints(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
    steps = _ints(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else None
    if axes is None:
        if len(node.inputs) > 3 and node.inputs[3] is not None:
            return None
        axes = list(range(len(starts)))
    if steps is None:
        if len(node.inputs) > 4 and node.inputs[4] is not None:
            return None
        steps = [1] * len(starts)
    if any(a < 0 for a in axes):
        x = node.inputs[0]
        if x is None or x.shape is None:
            return None
        axes = [a + len(x.shape) if a < 0 else a for a in axes]
    return [starts, ends, axes, steps]


def _merge_slices(node: ir.Node) -> int:
    """Merge Slice ``node`` into its users where every user is a Slice of other axes."""
    first = _slice_params(node)
    out = node.outputs[0]
    if first is None or out.is_graph_output() or not out.uses():
        return 0
    users = [use.node for use in out.uses()]
    seconds = [_slice_params(u) if u.inputs[0] is out else None for u in users]
    if any(p is None or set(p[2]) & set(first[2]) for p in seconds):
        return 0
    graph = node.graph
    for user, second in zip(users, seconds):
        merged = [a + b for a, b in zip(first, second)]
        name = user.outputs[0].name or "slice"
        params = [
            _constant(graph, f"{name}_{part}", np.array(v, np.int64))
            for part, v in zip(("starts", "ends", "axes", "steps"), merged)
        ]
        user.replace_input_with(0, node.inputs[0])
        for i, value in enumerate(params, start=1):
            if i < len(user.inputs):
                user.replace_input_with(i, value)
            else:
                user.resize_inputs(i + 1)
                user.replace_input_with(i, value)
    return len(users)


_NEUTRAL = {"Add": (0, 1), "Sub": (0, None), "Mul": (1, 1), "Div": (1, None)}


def _neutral_operand(node: ir.Node, tracker: _Tracker) -> ir.Value | None:
    """``x`` where ``node`` is x+0, 0+x, x-0, x*1, 1*x or x/1 and the constant does not
    broadcast x to a larger shape; else None."""
    if node.op_type not in _NEUTRAL or len(node.inputs) != 2 or None in node.inputs:
        return None
    value, commutes = _NEUTRAL[node.op_type]
    for k in (1, 0) if commutes else (1,):
        c, x = node.inputs[k], node.inputs[1 - k]
        if c.const_value is None or x.shape is None or c.const_value.size > (1 << 20):
            continue
        if x.dtype != c.dtype or not np.all(c.const_value.numpy() == value):
            continue
        cshape = list(c.const_value.shape)
        rank = len(x.shape)
        if len(cshape) > rank:
            continue
        xs = [tracker.dim(x, i) for i in range(rank - len(cshape), rank)]
        if all(d == 1 or d == e for d, e in zip(cshape, xs)):
            return x
    return None


def _merge_unsqueezes(node: ir.Node) -> bool:
    """Unsqueeze(Unsqueeze(x, a), b), the inner one used only here, becomes Unsqueeze(x, a+b')."""
    inner = node.inputs[0].producer() if node.inputs and node.inputs[0] is not None else None
    if inner is None or inner.op_type != "Unsqueeze" or inner.domain not in ("", "ai.onnx"):
        return False
    if len(node.inputs) < 2 or len(inner.inputs) < 2 or len(inner.outputs[0].uses()) != 1:
        return False
    x = inner.inputs[0]
    if x is None or x.shape is None or inner.outputs[0].is_graph_output():
        return False
    rank = len(x.shape)
    a = _squeeze_axes(inner, rank + len(_ints(inner.inputs[1]) or []))
    b = _squeeze_axes(node, None if a is None else rank + len(a) + len(_ints(node.inputs[1]) or []))
    if a is None or b is None:
        return False
    dims: list = ["x"] * rank  # follow where the inserted dims end up
    for axis in a:
        dims.insert(axis, "new")
    for axis in b:
        dims.insert(axis, "new")
    merged = [i for i, d in enumerate(dims) if d == "new"]
    axes = _constant(node.graph, (node.outputs[0].name or "unsqueeze") + "_axes", np.array(merged))
    node.replace_input_with(0, x)
    node.replace_input_with(1, axes)
    return True


def _transpose_as_reshape(node: ir.Node, tracker: _Tracker) -> list[int] | None:
    """A Reshape target equal to Transpose ``node`` when it keeps the order of every axis that
    may be larger than 1 (sizes from ``tracker``), else None."""
    x = node.inputs[0] if node.inputs else None
    perm_attr = node.attributes.get("perm")
    if x is None or x.shape is None or perm_attr is None:
        return None
    perm = list(perm_attr.as_ints())
    dims = [tracker.dim(x, i) for i in range(len(x.shape))]
    moving = [p for p in perm if dims[p] != 1]
    if moving != sorted(moving) or perm == sorted(perm):
        return None
    target = []
    for j, p in enumerate(perm):
        if p == j:
            target.append(0)  # the same axis in the same place: copied
        elif isinstance(dims[p], int):
            target.append(dims[p])
        else:
            target.append(-1)
    return target if target.count(-1) <= 1 else None


def fold_shape_chains(model: ir.Model) -> int:
    """Apply the rewrites above; returns how many values or inputs were rewritten."""
    dynamic = any(
        n.op_type == "Shape"
        and n.inputs[0] is not None
        and n.inputs[0].shape is not None
        and not n.inputs[0].shape.is_static()
        for n in ir.traversal.RecursiveGraphIterator(model.graph)
    )
    tracker = _Tracker(_symbolic_dims(model) if dynamic else {})
    changed = 0
    for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
        tracker.visit(node)
        graph = node.graph
        if node.domain in ("", "ai.onnx") and node.op_type in _NEUTRAL:
            x = _neutral_operand(node, tracker)
            out = node.outputs[0]
            if x is not None and not out.is_graph_output():
                out.replace_all_uses_with(x)
                changed += 1
                continue
        if node.op_type == "Transpose" and node.domain in ("", "ai.onnx"):
            target = _transpose_as_reshape(node, tracker)
            if target is not None:
                shape = _constant(
                    node.graph, (node.outputs[0].name or "t") + "_shape", np.array(target, np.int64)
                )
                reshape = ir.Node("", "Reshape", [node.inputs[0], shape], name=node.name)
                node.graph.insert_before(node, reshape)
                reshape.outputs[0].shape, reshape.outputs[0].dtype = (
                    node.outputs[0].shape,
                    node.outputs[0].dtype,
                )
                out = node.outputs[0]
                if out.is_graph_output():
                    name = out.name
                    out.replace_all_uses_with(reshape.outputs[0], replace_graph_outputs=True)
                    out.name, reshape.outputs[0].name = f"{name}__replaced", name
                else:
                    out.replace_all_uses_with(reshape.outputs[0])
                changed += 1
                continue
        if node.op_type == "Slice":
            changed += _merge_slices(node)
        if node.op_type == "Where" and node.outputs[0] in tracker.values:
            # a decided condition: the output is one of the two branches
            cond = tracker.get(node.inputs[0])
            out = node.outputs[0]
            n = len(tracker.values[out][0])
            for flag, branch in ((True, node.inputs[1]), (False, node.inputs[2])):
                picked = tracker.get(branch)
                if (
                    all(c is flag for c in cond[0])
                    and picked is not None
                    and len(picked[0]) == n
                    and not out.is_graph_output()
                ):
                    out.replace_all_uses_with(branch)
                    changed += 1
        if node.op_type == "Unsqueeze" and node.domain in ("", "ai.onnx"):
            x = _unsqueeze_of_squeeze(node)
            out = node.outputs[0]
            if x is not None and not out.is_graph_output():
                out.replace_all_uses_with(x)
                changed += 1
                continue
            changed += _merge_unsqueezes(node)
        if node.op_type == "Reshape" and len(node.inputs) == 2 and node.inputs[1] is not None:
            shape_value = node.inputs[1]
            tracked = tracker.get(shape_value)
            if shape_value.const_value is None and tracked is not None:
                target = _reshape_target(node, tracked, tracker)
                if target is not None:
                    name = shape_value.name or "shape"
                    node.replace_input_with(1, _constant(graph, name, np.array(target, np.int64)))
                    changed += 1
    # values whose every element is static, wherever they are used
    for value, (elems, scalar, dtype) in tracker.values.items():
        node = value.producer()
        if node is None or value.is_graph_output() or not value.uses():
            continue
        if value.const_value is not None or not all(isinstance(e, int) for e in elems):
            continue
        array = np.array(elems[0] if scalar else list(elems), dtype=dtype)
        value.replace_all_uses_with(_constant(node.graph, value.name or "shape", array))
        changed += 1
    return changed
