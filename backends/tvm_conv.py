"""A direct convolution kernel for the tvm target (depthwise convs and small dense KxK convs such
as a CNN's stem), written in TensorIR.

MobileNet-style networks spend about half their time in depthwise convs and the stem once their
1x1 convs run sparse, and TVM's own (tuned) schedules for them were the slowest part of effc's
MobileNetV2 build. ``conv_nchw`` computes one output row of R output channels per task (tasks
parallel over cores; R = 1 for a depthwise conv, up to 8 for a dense one, each input vector
loaded once for all R): the row's interior columns (where every tap lies inside the input row)
in register tiles of up to four vectors, broadcast weights times input vectors accumulated in
vector registers; a stride-s conv loads s contiguous vectors per tap and keeps every s-th lane
(``T.Shuffle``), so no gathers; the few border columns (where the padding cuts taps off) run
scalar with every tap checked. Rows whose taps fall in the padding skip them (no padded copy of
the input). The conv's bias, a residual add and a ReLU/ReLU6 clamp run as each tile is stored,
as in the sparse pointwise kernel. The last interior tile is shifted back to end at the last interior column, so
every tile is full width.

Which convs qualify (``conv_shape``): NCHW, a depthwise conv (channel multiplier 1) or a dense
(groups 1) k x k conv with k > 1, square kernel, equal strides, symmetric padding below k,
dilation 1, static shapes, at least one interior column. Whether the kernel or TVM's operator
runs each is decided as for the sparse layers (measured, a decision file, or a cost model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# TVM keeps a constant-size CPU allocation on the stack only below this many bytes
# (runtime::kMaxStackAlloca); a larger one becomes a workspace call and lives in memory
STACK_BYTES = 1024


@dataclass
class ConvCandidate:
    """One KxK conv the direct kernel could run: its decision and, where measured, both times."""

    key: str  # sha1 of the weight bytes (as for the sparse candidates)
    shape: tuple[int, ...]  # weight (O, C / groups, k, k)
    groups: int
    stride: int
    padding: int
    pixels: int  # input h * w
    dense_us: float | None = None
    kernel_us: float | None = None
    choice: str = "dense"  # "kernel" or "dense" (TVM's own operator)
    why: str = ""


def rows_for(o_per_group: int, groups: int) -> int:
    """Output channels a task keeps in registers: 1 for a depthwise conv (each output channel has
    its own input), else the largest of 8, 4, 2, 1 dividing the group's outputs (each input
    vector loaded once for all of them)."""
    if o_per_group == 1:
        return 1
    return next(r for r in (8, 4, 2, 1) if o_per_group % r == 0)


def plan(w: int, k: int, s: int, p: int, lanes: int, rows: int = 1):
    """(output width, first and one-past-last interior column, vector lanes V, vectors per tile
    m) for an input row of width ``w``. An interior column has every tap inside the row; with
    stride s a vector load of s*V contiguous values reads s - 1 past the last tap, which must
    stay inside the row too. V is the target's lanes, halved while wider than the interior; the
    rows x m accumulator vectors stay within the vector registers (32 with 16 lanes, else 16) and
    on the stack (a larger accumulator becomes a heap workspace, which LLVM cannot keep in
    registers, nor load an input vector once for all rows beside)."""
    ow = (w + 2 * p - k) // s + 1
    lo = (p + s - 1) // s
    hi = (w - 1 - (k - 1) + p - (s - 1)) // s + 1
    width = hi - lo
    vec = lanes
    while vec > 1 and vec > width:
        vec //= 2
    budget = (24 if lanes == 16 else 12) // rows
    m = 1
    while (
        m < 4 and vec * m * 2 <= width and m * 2 <= budget and rows * vec * m * 2 * 4 < STACK_BYTES
    ):
        m *= 2
    return ow, lo, hi, vec, m


def conv_shape(call) -> tuple[int, ...] | None:
    """(n, c, h, w, o, k, stride, padding, groups) of a relax conv2d call the kernel runs (a
    depthwise conv, or a dense KxK conv with k > 1), or None."""
    a = call.attrs
    try:
        n, c, h, w = (int(d) for d in call.args[0].ty.shape.values)
        o, per_group, kh, kw = (int(d) for d in call.args[1].ty.shape.values)
    except (TypeError, AttributeError):  # symbolic or unknown dims
        return None
    groups = int(a.groups)
    strides = [int(v) for v in a.strides]
    pads = [int(v) for v in a.padding]
    depthwise = groups == c == o and per_group == 1
    if not (
        (depthwise or (groups == 1 and kh > 1))
        and kh == kw
        and strides[0] == strides[1]
        and len(set(pads)) == 1
        and pads[0] < kh
        and [int(v) for v in a.dilation] == [1, 1]
        and str(a.data_layout) == "NCHW"
        and str(a.kernel_layout) == "OIHW"
        and str(a.out_layout) == "NCHW"
    ):
        return None
    _, lo, hi, _, _ = plan(w, kh, strides[0], pads[0], 1)
    if hi - lo < 1 or (h + 2 * pads[0] - kh) // strides[0] + 1 < 1:
        return None
    return n, c, h, w, o, kh, strides[0], pads[0], groups


def epilogue(acc, bias, res, lo: float, hi: float, lanes: int = 1):
    """``acc + bias (+ res)`` clamped to [lo, hi], as TensorIR: what effc's TVM kernels store
    (a conv's bias, a residual connection, a ReLU/ReLU6), built in Python while TVMScript parses
    a kernel. ``res`` is None without a residual; ``lanes`` > 1 for vector values (the scalars
    broadcast)."""
    from tvm.script import tirx as T

    def wide(v):
        return T.Broadcast(v, lanes) if lanes > 1 else v

    value = acc + wide(bias)
    if res is not None:
        value = value + res
    return T.min(T.max(value, wide(T.float32(lo))), wide(T.float32(hi)))


def conv_nchw(
    n: int,
    c: int,
    h: int,
    w: int,
    o: int,
    k: int,
    s: int,
    p: int,
    groups: int,
    lanes: int = 16,
    lo: float = -math.inf,
    hi: float = math.inf,
    residual: bool = False,
):
    """The TensorIR kernel (see the module docstring) for one layer's shapes: inputs x (n, c, h,
    w), weight (o, c / groups, k, k), bias (o,), res (the output's shape with ``residual``: a
    residual connection added before the clamp; else one value, never read); output (n, o, oh,
    ow). A task is one output row of R output channels (``rows_for``) of one group. The index
    expressions are Python functions inlined as the kernel is parsed (a ``let`` would turn a
    scalar into a buffer in TVM 0.27, see ``tvm_sparse.pointwise_nchw``)."""
    from tvm.script import tirx as T

    cpg, opg = c // groups, o // groups
    R = rows_for(opg, groups)
    ob_n = o // R
    oh = (h + 2 * p - k) // s + 1
    ow, ilo, ihi, V, m = plan(w, k, s, p, lanes, R)
    tile = V * m
    tiles = (ihi - ilo + tile - 1) // tile
    nl, nr = ilo, ow - ihi
    keep = [j * s for j in range(V)]  # every s-th lane of s contiguous vectors
    res_shape = (n, o, oh, ow) if residual else (1,)

    def batch(task):
        return task // (oh * ob_n)

    def channel(task, i):  # output channel i of the task's R
        return task // oh % ob_n * R + i

    def source(task, j):  # input channel j of the task's group
        return task // oh % ob_n * R // opg * cpg + j

    def in_row(task, kh):
        return task % oh * s + kh - p

    def first(t):  # the first column of interior tile t (the last one shifted back)
        return T.min(ilo + t * tile, ihi - tile)

    def border(e):  # border column e: the left ones, then the right ones
        return T.Select(e < nl, e, e - nl + ihi)

    @T.prim_func
    def kernel(
        x: T.Buffer((n, c, h, w), "float32"),
        wt: T.Buffer((o, cpg, k, k), "float32"),
        bias: T.Buffer((o,), "float32"),
        res: T.Buffer(res_shape, "float32"),
        out: T.Buffer((n, o, oh, ow), "float32"),
    ):
        T.func_attr({"tir.noalias": True})
        for task in T.parallel(n * ob_n * oh):
            acc = T.alloc_buffer((R, tile), "float32", scope="global")
            for t in range(tiles):
                for i in T.unroll(R):
                    for q in T.unroll(m):
                        acc[i, T.Ramp(q * V, 1, V)] = T.Broadcast(T.float32(0), V)
                for j in range(cpg):
                    for kh in T.unroll(k):
                        if in_row(task, kh) >= 0 and in_row(task, kh) < h:
                            for kw in T.unroll(k):
                                for q in T.unroll(m):
                                    for i in T.unroll(R):
                                        acc[i, T.Ramp(q * V, 1, V)] = acc[
                                            i, T.Ramp(q * V, 1, V)
                                        ] + T.Broadcast(
                                            wt[channel(task, i), j, kh, kw], V
                                        ) * T.Shuffle(
                                            [
                                                x[
                                                    batch(task),
                                                    source(task, j),
                                                    in_row(task, kh),
                                                    T.Ramp(
                                                        (first(t) + q * V) * s + kw - p + r * V,
                                                        1,
                                                        V,
                                                    ),
                                                ]
                                                for r in range(s)
                                            ],
                                            keep,
                                        )
                for i in T.unroll(R):
                    for q in T.unroll(m):
                        out[
                            batch(task),
                            channel(task, i),
                            task % oh,
                            T.Ramp(first(t) + q * V, 1, V),
                        ] = epilogue(
                            acc[i, T.Ramp(q * V, 1, V)],
                            bias[channel(task, i)],
                            res[
                                batch(task),
                                channel(task, i),
                                task % oh,
                                T.Ramp(first(t) + q * V, 1, V),
                            ]
                            if residual
                            else None,
                            lo,
                            hi,
                            V,
                        )
            for e in range(nl + nr):
                for i in T.unroll(R):
                    acc[i, 0] = T.float32(0)
                for j in range(cpg):
                    for kh in T.unroll(k):
                        for kw in T.unroll(k):
                            if (
                                in_row(task, kh) >= 0
                                and in_row(task, kh) < h
                                and border(e) * s + kw - p >= 0
                                and border(e) * s + kw - p < w
                            ):
                                for i in T.unroll(R):
                                    acc[i, 0] = (
                                        acc[i, 0]
                                        + wt[channel(task, i), j, kh, kw]
                                        * x[
                                            batch(task),
                                            source(task, j),
                                            in_row(task, kh),
                                            border(e) * s + kw - p,
                                        ]
                                    )
                for i in T.unroll(R):
                    out[batch(task), channel(task, i), task % oh, border(e)] = epilogue(
                        acc[i, 0],
                        bias[channel(task, i)],
                        res[batch(task), channel(task, i), task % oh, border(e)]
                        if residual
                        else None,
                        lo,
                        hi,
                    )

    return kernel


def conv_module(w4d, n, h, w, stride=1, padding=0, groups=1, ep=None):
    """A relax module of one conv (``w4d`` its OIHW weight) on an (n, C, h, w) input, with its
    epilogue ``ep`` (an ``Epilogue``: bias, residual, clamp bounds) in the form TVM's ONNX
    importer writes (a bias add of a (1, O, 1, 1) constant, the residual and the clamp bounds as
    tensors, here inputs after ``x``), so a tuning database made on the whole model covers it:
    what a layer's dense form is measured on. Returns (module, input shapes)."""
    import numpy as np
    from tvm import relax

    o, c, k = w4d.shape[0], w4d.shape[1] * groups, w4d.shape[2]
    oh, ow = (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1
    bias = ep.bias if ep is not None else None
    lo = ep.lo if ep is not None and ep.lo != -math.inf else None
    hi = ep.hi if ep is not None and ep.hi != math.inf else None
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((n, c, h, w), "float32"))
    res = relax.Var("res", relax.TensorType((n, o, oh, ow), "float32"))
    bounds = [relax.Var(name, relax.TensorType((), "float32")) for name in ("lo", "hi")]
    used = [res] if ep is not None and ep.residual is not None else []
    used += [b for b, v in zip(bounds, (lo, hi)) if v is not None]
    with bb.function("main", [x, *used]):
        with bb.dataflow():
            conv = relax.op.nn.conv2d(
                x, relax.const(w4d), strides=stride, padding=padding, groups=groups
            )
            y = bb.emit(conv)
            if bias is not None:
                y = bb.emit(relax.op.add(y, relax.const(np.asarray(bias).reshape(1, o, 1, 1))))
            if res in used:
                y = bb.emit(relax.op.add(*((res, y) if ep.residual_first else (y, res))))
            if lo is not None:
                y = bb.emit(relax.op.maximum(y, bounds[0]))
            if hi is not None:
                y = bb.emit(relax.op.minimum(y, bounds[1]))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get(), [tuple(int(d) for d in v.ty.shape.values) for v in (x, *used)]


def time_dense(build, mod, shapes, ep, repeat=20) -> tuple[float, list]:
    """(median µs of ``build(mod)`` run 10 times per timing, its inputs as numpy arrays) for a
    module from ``conv_module``: the inputs of ``shapes`` random, the 0-d ones ``ep``'s clamp
    bounds."""
    import numpy as np
    import tvm
    from tvm import relax

    dev = tvm.cpu()
    rng = np.random.default_rng(0)
    bounds = iter([] if ep is None else [v for v in (ep.lo, ep.hi) if abs(v) != math.inf])
    xs = [
        np.float32(next(bounds)) if len(s) == 0 else rng.standard_normal(s, np.float32)
        for s in shapes
    ]
    vm = relax.VirtualMachine(build(mod), dev)
    args = [tvm.runtime.tensor(np.asarray(a)) for a in xs]
    return vm.time_evaluator("main", dev, number=10, repeat=repeat)(*args).median * 1e6, xs


def time_kernel(kernel, target, inputs, out_shape, repeat=20) -> float:
    """Median µs of effc's TensorIR ``kernel`` compiled for ``target`` on the numpy ``inputs``
    and a float32 output of ``out_shape``, 10 runs per timing."""
    import numpy as np
    import tvm

    lib = tvm.compile(tvm.IRModule({"main": kernel}), target=target)
    args = [tvm.runtime.tensor(np.asarray(a)) for a in inputs]
    args.append(tvm.runtime.tensor(np.zeros(out_shape, np.float32)))
    return lib.mod.time_evaluator("main", tvm.cpu(), number=10, repeat=repeat)(*args).median * 1e6


def measure_conv(build, target, lanes, w4d, shape, ep, repeat=20) -> tuple[float, float]:
    """(dense µs, kernel µs) of one layer (``shape`` from ``conv_shape``) with its epilogue ``ep``
    on this machine: TVM's conv built alone by ``build(module)`` (the target's build, with its
    tuning database) and the kernel, medians of ``repeat`` timings of 10 runs."""
    import numpy as np

    n, c, h, w, o, k, s, p, groups = shape
    mod, shapes = conv_module(w4d, n, h, w, s, p, groups, ep)
    dense_us, xs = time_dense(build, mod, shapes, ep, repeat)
    fused = ep.residual is not None
    kernel = conv_nchw(n, c, h, w, o, k, s, p, groups, lanes, ep.lo, ep.hi, fused)
    bias = ep.bias if ep.bias is not None else np.zeros(o, np.float32)
    res = xs[1] if fused else np.zeros(1, np.float32)
    out = (n, o, (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1)
    return dense_us, time_kernel(kernel, target, [xs[0], w4d, bias, res], out, repeat)
