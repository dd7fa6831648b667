"""LayerNorm sites on ONNX and the graphs each ``layernorm`` mode writes in their place.

Sites: a ``LayerNormalization`` over the last axis (decomposed ReduceMean/Sub/Pow/ReduceMean/
Add/Sqrt/Div[/Mul/Add] chains are fused into one first, opset 17+), seen either plainly
(channels last) or as a *channel* LayerNorm of an NCHW tensor when it sits between
Reshape(B, C, HW) + Transpose and Transpose + Reshape(B, C, H, W) (Restormer's to_3d / to_4d).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass
from onnxscript.version_converter import convert_version

from effc.ir.ort import session_for
from effc.passes.fuse._onnx import const, initializer, insert, only_user, replace, static_shape


@dataclass
class Site:
    node: ir.Node  # the LayerNormalization
    x: ir.Value  # normalized tensor in its own layout (NCHW for channel sites)
    out: ir.Value  # value the replacement takes over
    axis: int  # channel axis of x: -1, or 1 for channel sites
    gamma: np.ndarray
    beta: np.ndarray
    eps: float

    @property
    def channel(self) -> bool:
        return self.axis == 1

    @property
    def name(self) -> str:
        return self.node.name or self.out.name


def _attr(node: ir.Node, name: str, default=None):
    a = node.attributes.get(name)
    return a.value if a is not None else default


def _reduce_axes(node: ir.Node) -> list[int] | None:
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        axes = const(node.inputs[1])
        return None if axes is None else [int(a) for a in np.atleast_1d(axes)]
    axes = _attr(node, "axes")
    return list(axes) if axes is not None else None


def _last_axis_only(node: ir.Node, rank: int | None) -> bool:
    axes = _reduce_axes(node)
    return (
        node.op_type == "ReduceMean"
        and _attr(node, "keepdims", 1) == 1
        and axes is not None
        and len(axes) == 1
        and (axes[0] == -1 or (rank is not None and axes[0] == rank - 1))
    )


def _users(value: ir.Value) -> list[ir.Node]:
    return [u.node for u in value.uses()]


def _fuse_decomposed(graph: ir.Graph, mean: ir.Node) -> bool:
    """ReduceMean -> Sub -> Pow 2 / Mul -> ReduceMean -> Add eps -> Sqrt -> Div [-> Mul g][-> Add b]."""
    x = mean.inputs[0]
    rank = len(x.shape) if x is not None and x.shape is not None else None
    if not _last_axis_only(mean, rank):
        return False
    subs = [n for n in _users(mean.outputs[0]) if n.op_type == "Sub" and n.inputs[0] is x]
    if len(subs) != 1 or len(_users(mean.outputs[0])) != 1:
        return False
    d = subs[0].outputs[0]
    users = _users(d)
    sq = next((n for n in users if n.op_type in ("Pow", "Mul")), None)
    div = next((n for n in users if n.op_type == "Div" and n.inputs[0] is d), None)
    if sq is None or div is None or d.is_graph_output():
        return False
    if sq.op_type == "Pow" and not np.all(const(sq.inputs[1]) == 2):
        return False
    if sq.op_type == "Mul" and not (sq.inputs[0] is d and sq.inputs[1] is d):
        return False
    if len(set(map(id, users))) != 2:
        return False
    var = only_user(sq.outputs[0])
    if var is None or not _last_axis_only(var, rank):
        return False
    add = only_user(var.outputs[0])
    eps = const(add.inputs[1]) if add is not None and add.op_type == "Add" else None
    sqrt = only_user(add.outputs[0]) if eps is not None and eps.size == 1 else None
    if sqrt is None or sqrt.op_type != "Sqrt" or only_user(sqrt.outputs[0]) is not div:
        return False
    out, channels = div.outputs[0], (x.shape[-1] if x.shape is not None else None)
    if not isinstance(channels, int):
        return False
    gamma, beta = np.ones(channels, np.float32), np.zeros(channels, np.float32)
    nxt = only_user(out)
    if nxt is not None and nxt.op_type == "Mul" and const(nxt.inputs[1]) is not None:
        g = const(nxt.inputs[1])
        if g.size in (1, channels):
            gamma, out = np.broadcast_to(g.reshape(-1), channels).astype(np.float32), nxt.outputs[0]
            nxt = only_user(out)
    if nxt is not None and nxt.op_type == "Add" and const(nxt.inputs[1]) is not None:
        b = const(nxt.inputs[1])
        if b.size in (1, channels):
            beta, out = np.broadcast_to(b.reshape(-1), channels).astype(np.float32), nxt.outputs[0]
    base = mean.name or "layernorm"
    inputs = [
        x,
        initializer(graph, f"{base}_gamma", gamma),
        initializer(graph, f"{base}_beta", beta),
    ]
    ln = ir.node("LayerNormalization", inputs, {"axis": -1, "epsilon": float(eps.reshape(()))})
    new = insert(graph, mean, ln)
    replace(out, new)
    return True


OPSET = 18  # LayerNormalization needs 17; the rewrites write ReduceMean with axes as an input (18)


def ensure_opset(model: ir.Model) -> bool:
    """Raise the default-domain opset to 18 if lower; True if raised."""
    return raise_opset(model, OPSET)


def raise_opset(model: ir.Model, target: int) -> bool:
    """Raise the default-domain opset to ``target`` (onnxscript's version converter); True if
    raised."""
    if model.opset_imports.get("", 1) >= target:
        return False

    convert_version(model, target)

    # the converter leaves some ops with an attribute that later opsets read as an input (axes
    # of Squeeze/Unsqueeze/ReduceSum since 13, of the other reductions since 18; Split's sizes
    # since 13): move it to that input
    for node in model.graph.all_nodes():
        moved = _ATTR_TO_INPUT.get(node.op_type) if node.domain == "" else None
        if moved is None or target < moved[0] or moved[1] not in node.attributes:
            continue
        values = np.array(list(node.attributes.pop(moved[1]).value), dtype=np.int64)
        name = f"{node.name or node.op_type}_{moved[1]}"
        if len(node.inputs) < 2:
            node.resize_inputs(2)
        node.replace_input_with(1, initializer(model.graph, name, values))
    return True


_ATTR_TO_INPUT: dict[str, tuple[int, str]] = {}  # op -> (opset it moved in, attribute)
_REDUCE_18 = {
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ReduceMax",
    "ReduceMean",
    "ReduceMin",
    "ReduceProd",
    "ReduceSumSquare",
}
_ATTR_TO_INPUT.update({op: (18, "axes") for op in _REDUCE_18})
_ATTR_TO_INPUT.update({op: (13, "axes") for op in ("Squeeze", "Unsqueeze", "ReduceSum")})
_ATTR_TO_INPUT["Split"] = (13, "split")


def fuse_decomposed(model: ir.Model) -> int:
    """Fuse every decomposed last-axis LayerNorm (raising the opset to 18 first if needed)."""
    graph = model.graph
    if not any(n.op_type == "ReduceMean" and n.domain == "" for n in graph):
        return 0
    ensure_opset(model)
    candidates = [n for n in graph if n.op_type == "ReduceMean" and n.domain == ""]

    fired = sum(_fuse_decomposed(graph, n) for n in candidates if n.graph is graph)
    if fired:
        RemoveUnusedNodesPass()(model)
    return fired


def _producer(value: ir.Value | None, op: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == op and node.domain == "" else None


def _channel_sandwich(ln: ir.Node) -> tuple[ir.Value, ir.Value] | None:
    """(x NCHW, final NCHW output) if ``ln`` normalizes channels of an NCHW tensor via to_3d/to_4d."""
    t_in = _producer(ln.inputs[0], "Transpose")
    r_in = _producer(t_in.inputs[0], "Reshape") if t_in is not None else None
    if r_in is None or list(_attr(t_in, "perm", [])) != [0, 2, 1]:
        return None
    x = r_in.inputs[0]
    shape = static_shape(x)
    if (
        shape is None
        or len(shape) != 4
        or static_shape(r_in.outputs[0])
        != (
            shape[0],
            shape[1],
            shape[2] * shape[3],
        )
    ):
        return None
    t_out = only_user(ln.outputs[0])
    if t_out is None or t_out.op_type != "Transpose" or list(_attr(t_out, "perm", [])) != [0, 2, 1]:
        return None
    r_out = only_user(t_out.outputs[0])
    if r_out is None or r_out.op_type != "Reshape" or static_shape(r_out.outputs[0]) != shape:
        return None
    return x, r_out.outputs[0]


def find_sites(model: ir.Model) -> list[Site]:
    sites = []
    for node in model.graph:
        if node.op_type != "LayerNormalization" or node.domain != "":
            continue
        x = node.inputs[0]
        rank = len(x.shape) if x.shape is not None else None
        axis = _attr(node, "axis", -1)
        out = node.outputs[0]
        if rank is None or axis not in (-1, rank - 1) or not (out.uses() or out.is_graph_output()):
            continue

        gamma = const(node.inputs[1])
        beta = const(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] else None
        if gamma is None or (len(node.inputs) > 2 and node.inputs[2] is not None and beta is None):
            continue
        c = x.shape[-1]
        beta = beta if beta is not None else np.zeros(c, np.float32)
        eps = float(_attr(node, "epsilon", 1e-5))
        sandwich = _channel_sandwich(node)
        if sandwich is not None:
            sites.append(Site(node, sandwich[0], sandwich[1], 1, gamma, beta, eps))
        else:
            sites.append(Site(node, x, node.outputs[0], -1, gamma, beta, eps))
    return sites


def _vec(graph: ir.Graph, site: Site, name: str, v: np.ndarray) -> ir.Value:
    shape = (-1, 1, 1) if site.channel else (-1,)
    return initializer(graph, f"{site.name}_{name}", v.astype(np.float32).reshape(shape))


def _scalar(graph: ir.Graph, site: Site, name: str, v: float) -> ir.Value:
    return initializer(graph, f"{site.name}_{name}", np.array(v, dtype=np.float32))


def _axes(graph: ir.Graph, site: Site) -> ir.Value:
    return initializer(graph, f"{site.name}_axes", np.array([site.axis], dtype=np.int64))


def _emit(graph: ir.Graph, site: Site, ops: list[tuple[str, list]]) -> None:
    """Insert ops (op_type, inputs; ``"$"`` = previous output, ``"x"`` = the site input)."""
    prev = site.x
    values = {"x": site.x}
    for i, (op, inputs) in enumerate(ops):
        resolved = [values.get(a, prev) if isinstance(a, str) else a for a in inputs]
        attrs = {"keepdims": 1} if op == "ReduceMean" else {}
        prev = insert(graph, site.node, ir.node(op, resolved, attrs))
        values[f"${i}"] = prev
    replace(site.out, prev)


def write_channel_exact(graph: ir.Graph, site: Site) -> None:
    """(x - mean_c) / sqrt(var_c + eps) * g + b over axis 1 of NCHW: no transposes, same math."""
    ax = _axes(graph, site)
    _emit(
        graph,
        site,
        [
            ("ReduceMean", ["x", ax]),
            ("Sub", ["x", "$0"]),
            ("Mul", ["$1", "$1"]),
            ("ReduceMean", ["$2", ax]),
            ("Add", ["$3", _scalar(graph, site, "eps", site.eps)]),
            ("Sqrt", ["$4"]),
            ("Div", ["$1", "$5"]),
            ("Mul", ["$6", _vec(graph, site, "gamma", site.gamma)]),
            ("Add", ["$7", _vec(graph, site, "beta", site.beta)]),
        ],
    )


def write_channel_conv(graph: ir.Graph, site: Site) -> None:
    """The same normalisation as two 1x1 convs: d = (I - 1/C) x centres every pixel's channels,
    var = (1/C) d^2 (+ eps as the bias); y = d / sqrt(var) * g + b. Convs keep onnxruntime's
    blocked NCHWc layout, which pays off on large images."""
    c = len(site.gamma)
    centre = (np.eye(c, dtype=np.float32) - np.float32(1.0 / c))[:, :, None, None]
    mean = np.full((1, c, 1, 1), 1.0 / c, dtype=np.float32)
    _emit(
        graph,
        site,
        [
            ("Conv", ["x", initializer(graph, f"{site.name}_centre", centre)]),
            ("Mul", ["$0", "$0"]),
            (
                "Conv",
                [
                    "$1",
                    initializer(graph, f"{site.name}_mean", mean),
                    initializer(graph, f"{site.name}_eps", np.array([site.eps], np.float32)),
                ],
            ),
            ("Sqrt", ["$2"]),
            ("Div", ["$0", "$3"]),
            ("Mul", ["$4", _vec(graph, site, "gamma", site.gamma)]),
            ("Add", ["$5", _vec(graph, site, "beta", site.beta)]),
        ],
    )


CHANNEL_FORMS = {"reduce": write_channel_exact, "conv": write_channel_conv}
_TIMINGS: dict[tuple, dict[str, float]] = {}


def time_channel_forms(shape: tuple[int, ...], threads: int = 2) -> dict[str, float]:
    """Milliseconds of each exact channel-LayerNorm form on an NCHW tensor of ``shape`` under
    onnxruntime (all graph optimizations, ``threads`` intra-op threads); cached per shape."""
    key = (tuple(shape), threads)
    if key in _TIMINGS:
        return _TIMINGS[key]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    result = {}
    for form, write in CHANNEL_FORMS.items():
        inp = ir.Value(name="x", shape=ir.Shape(shape), type=ir.TensorType(ir.DataType.FLOAT))
        graph = ir.Graph([inp], [], nodes=[], opset_imports={"": OPSET})
        anchor = ir.node("Identity", [inp])
        graph.append(anchor)
        graph.outputs.append(anchor.outputs[0])
        c = shape[1]
        site = Site(anchor, inp, anchor.outputs[0], 1, np.ones(c), np.zeros(c), 1e-5)
        write(graph, site)
        session = session_for(ir.Model(graph, ir_version=10), threads)
        session.run(None, {"x": x})
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(3):
                session.run(None, {"x": x})
            best = min(best, (time.perf_counter() - t0) / 3 * 1e3)
        result[form] = best
    _TIMINGS[key] = result
    return result


def write_affine(graph: ir.Graph, site: Site, a: np.ndarray, b: np.ndarray) -> None:

    _emit(
        graph,
        site,
        [("Mul", ["x", _vec(graph, site, "a", a)]), ("Add", ["$0", _vec(graph, site, "b", b)])],
    )


def write_rms(graph: ir.Graph, site: Site) -> None:
    """g * x / sqrt(mean_c(x^2) + eps) + b: LayerNorm without the mean subtraction."""
    ax = _axes(graph, site)
    _emit(
        graph,
        site,
        [
            ("Mul", ["x", "x"]),
            ("ReduceMean", ["$0", ax]),
            ("Add", ["$1", _scalar(graph, site, "eps", site.eps)]),
            ("Sqrt", ["$2"]),
            ("Div", ["x", "$3"]),
            ("Mul", ["$4", _vec(graph, site, "gamma", site.gamma)]),
            ("Add", ["$5", _vec(graph, site, "beta", site.beta)]),
        ],
    )
