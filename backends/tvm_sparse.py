"""Block-sparse kernels for the tvm target, written in TensorIR, and the relax rewrite that uses
them for the layers where they beat TVM's dense operator.

Kernel (``pointwise_nchw``): a 1x1 convolution (or a linear layer, H = W = 1) in NCHW whose
weight is stored as block sparse rows of R x 1 blocks (R output channels at one input channel,
kernel-sparsity's ``Rx1`` pattern): for each output row block ``ob`` and pixel tile (the pairs
parallel over cores), the kept blocks ``j in indptr[ob]..indptr[ob+1]`` (a data-dependent loop)
add ``data[j, r] * x[n, indices[j], tile]`` into R x tile accumulators held in vector registers
(AVX2/AVX-512 on x86, NEON on aarch64, SIMD128 on wasm32 by the target's vector width). The last
tile is shifted back to end at the last pixel, so any pixel count runs full-width tiles.

The rewrite (``sparsify``) walks the imported relax module: every ``relax.nn.conv2d`` with a
constant 1x1 weight (groups 1, stride 1, no padding) whose zeros form whole R x 1 blocks is a
candidate; ``decide`` times the dense operator (built alone with the same tuning database) and
the sparse kernel on this machine, or applies a cost model / a decision file for cross targets,
and the winners become ``call_tir`` of the sparse kernel with the packed arrays as constants.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

import effc.backends.tvm_conv as tvm_conv
from effc.errors import InputError

# a cross target cannot be timed here (timings under qemu mean nothing): the sparse kernel is
# chosen where at most this fraction of the blocks is kept; measured on x86 (see docs/targets.md)
COST_MODEL_MAX_DENSITY = 0.5


@dataclass
class Candidate:
    """One 1x1 conv the sparse kernel could run."""

    key: str  # sha1 of the weight bytes (how the ONNX site and the relax constant are matched)
    shape: tuple[int, ...]  # (O, C, 1, 1)
    pixels: int
    rows: int  # R
    density: float  # kept blocks / blocks
    dense_us: float | None = None
    sparse_us: float | None = None
    choice: str = "dense"
    why: str = ""


def weight_key(w: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(w, np.float32).tobytes()).hexdigest()[:16]


def block_rows(w2d: np.ndarray, candidates=(16, 8, 4), dense: bool = False) -> int | None:
    """The largest R whose R x 1 blocks hold every zero of the (O, C) weight as whole blocks
    (a weight without zeros only with ``dense``: the kernel run on every block, a baseline)."""
    o = w2d.shape[0]
    for r in candidates:
        if o % r:
            continue
        nz = (w2d != 0).reshape(o // r, r, -1)
        if (nz.any(1) == nz.all(1)).all() and (dense or not nz.all()):
            return r
    return None


def pack(w2d: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(data (nnz, R), indices (nnz,) int32, indptr (O/R + 1,) int32) of R x 1 blocks."""
    o, c = w2d.shape
    blocks = w2d.reshape(o // r, r, c)
    kept = (blocks != 0).any(1)  # (O/R, C)
    indptr = np.concatenate([[0], np.cumsum(kept.sum(1))]).astype(np.int32)
    rows, cols = np.nonzero(kept)
    data = blocks[rows, :, cols].astype(np.float32)  # (nnz, R)
    if data.size == 0:  # keep buffers non-empty
        data = np.zeros((1, r), np.float32)
        cols = np.zeros(1, np.int64)
    return np.ascontiguousarray(data), cols.astype(np.int32), indptr


STACK_BYTES = tvm_conv.STACK_BYTES  # accumulators must stay below it (see tvm_conv)


def tile_for(r: int, lanes: int, pixels: int) -> int:
    """Pixels per register tile: as many vectors as leave the R x tile accumulators, one input
    vector and the weight broadcasts in the vector register file (32 registers with AVX-512 and
    NEON, 16 with AVX2 and what a WebAssembly engine maps SIMD128 to), at most 4 vectors, the
    accumulators under STACK_BYTES; never wider than the layer."""
    regs = 32 if lanes == 16 else 16
    tile = lanes * 4  # whole vectors, a power of two of them (LLVM splits odd widths badly)
    while tile > 1 and (tile > lanes * max(1, (regs - 4) // r) or r * tile * 4 >= STACK_BYTES):
        tile //= 2  # within the registers, and on the stack (else a heap workspace)
    return max(1, min(tile, pixels))


def pointwise_nchw(
    n: int,
    c: int,
    o: int,
    pixels: int,
    r: int,
    nnz: int,
    lanes: int = 16,
    lo: float = -math.inf,
    hi: float = math.inf,
    residual: bool = False,
):
    """The TensorIR kernel (see the module docstring) for one layer's shapes.

    Register-tiled: a task is one pixel tile of one output row block (tasks parallel over cores,
    tile-major so a thread's consecutive tasks reuse the same input columns from L1). Its R x
    tile accumulators (a small ``global`` buffer: TVM puts it on the stack and LLVM in vector
    registers) are zeroed, every kept block adds R broadcast weights times one input tile, and
    the tile is stored once. The last tile is shifted back to end at the last pixel (it
    recomputes a few pixels instead of a scalar tail), so every tile is full width. The block
    bounds and column are read inline: a scalar bound with a ``let`` becomes a buffer in TVM
    0.27, which keeps the accumulators in memory. The epilogue adds the per-channel ``bias`` and
    clamps to [lo, hi] as the tile is stored (a conv's bias and a ReLU/ReLU6 fused: no extra
    pass over the output); with ``residual`` it adds ``res`` (a residual connection, shaped as
    the output) between the two. Without, ``res`` is a one-value placeholder, never read."""
    from tvm.script import tirx as T

    ob_count = o // r
    res_shape = (n, o, pixels) if residual else (1,)
    tile = tile_for(r, lanes, pixels)
    tiles = (pixels + tile - 1) // tile

    @T.prim_func
    def kernel(
        x: T.Buffer((n, c, pixels), "float32"),
        data: T.Buffer((nnz, r), "float32"),
        indices: T.Buffer((nnz,), "int32"),
        indptr: T.Buffer((ob_count + 1,), "int32"),
        bias: T.Buffer((o,), "float32"),
        res: T.Buffer(res_shape, "float32"),
        out: T.Buffer((n, o, pixels), "float32"),
    ):
        T.func_attr({"tir.noalias": True})
        for b in range(n):
            for task in T.parallel(tiles * ob_count):
                acc = T.alloc_buffer((r, tile), "float32", scope="global")
                for i in T.unroll(r):
                    for p in T.vectorized(tile):
                        acc[i, p] = T.float32(0)
                for j in range(indptr[task % ob_count], indptr[task % ob_count + 1]):
                    for i in T.unroll(r):
                        for p in T.vectorized(tile):
                            acc[i, p] = (
                                acc[i, p]
                                + data[j, i]
                                * x[
                                    b, indices[j], T.min(task // ob_count * tile, pixels - tile) + p
                                ]
                            )
                for i in T.unroll(r):
                    for p in T.vectorized(tile):
                        out[
                            b,
                            task % ob_count * r + i,
                            T.min(task // ob_count * tile, pixels - tile) + p,
                        ] = tvm_conv.epilogue(
                            acc[i, p],
                            bias[task % ob_count * r + i],
                            res[
                                b,
                                task % ob_count * r + i,
                                T.min(task // ob_count * tile, pixels - tile) + p,
                            ]
                            if residual
                            else None,
                            lo,
                            hi,
                        )

    return kernel


def lanes_for(target) -> int:
    """f32 lanes of the target's widest vector: 16 with AVX-512, 8 with AVX2, else 4."""
    text = str(target)
    if "aarch64" in text or "wasm32" in text:
        return 4
    from tvm.target import codegen

    feats = set()
    try:
        feats = {str(f) for f in codegen.llvm_get_cpu_features(target)}
    except Exception:
        pass
    if "avx512f" in feats:
        return 16
    return 8


# ---------------------------------------------------------------- decisions
def load_decisions(path: str | Path) -> dict[str, str]:
    """A pinned decision file: {"layers": {weight key: "sparse" | "kernel" | "dense"}} ("sparse"
    for a block-sparse 1x1 conv, "kernel" for a conv run by effc's direct kernel)."""
    try:
        doc = json.loads(Path(path).read_text())
        layers = doc["layers"]
        if not all(v in ("sparse", "dense", "kernel") for v in layers.values()):
            raise ValueError("choices must be sparse, kernel or dense")
        return {k: str(v) for k, v in layers.items()}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{path} is not a decision file ({e})") from e


def save_decisions(path: Path, candidates: list[Candidate]) -> None:
    doc = {
        "format": "effc-tvm-decisions",
        "layers": {c.key: c.choice for c in candidates},
        "measured": [asdict(c) for c in candidates],
    }
    path.write_text(json.dumps(doc, indent=1))


# ---------------------------------------------------------------- relax rewrite
def _is_plain_pointwise(call) -> bool:
    a = call.attrs
    return (
        [int(v) for v in a.strides] == [1, 1]
        and [int(v) for v in a.padding] == [0, 0, 0, 0]
        and [int(v) for v in a.dilation] == [1, 1]
        and int(a.groups) == 1
        and str(a.data_layout) == "NCHW"
        and str(a.kernel_layout) == "OIHW"
    )


@dataclass
class Epilogue:
    """What follows a candidate conv and runs inside the kernel: a per-channel bias, then a
    residual add (another tensor of the output's shape), then a clamp (ReLU: lo 0; ReLU6: lo 0,
    hi 6), each used only by the next."""

    end: object  # the last fused call (its binding gets the kernel's result)
    bias: np.ndarray | None = None
    residual: object = None  # the relax expression added
    residual_first: bool = False  # the add's first operand (as the model writes it)
    lo: float = -math.inf
    hi: float = math.inf


def _scalar(e) -> float | None:
    import tvm

    if isinstance(e, tvm.ir.expr.Constant):
        v = e.value.numpy()
        if v.size == 1:
            return float(v.reshape(()))
    return None


def _same_shape(a, b) -> bool:
    try:
        return [int(d) for d in a.ty.shape.values] == [int(d) for d in b.ty.shape.values]
    except (TypeError, AttributeError):  # symbolic or unknown
        return False


def epilogues(func, conv_op) -> dict:
    """For each conv2d call in ``func``'s dataflow blocks, the bias add and the clamps that
    follow it where each intermediate has exactly one user (TVM's ONNX importer writes Clip as
    call_tir of ``maximum``/``minimum`` kernels with constant scalars; also relax maximum,
    minimum, clip and relu)."""
    import tvm
    from tvm import relax

    ops = {n: tvm.ir.Op.get(f"relax.{n}") for n in ("add", "maximum", "minimum", "clip")}
    ops["relu"] = tvm.ir.Op.get("relax.nn.relu")
    call_tir = tvm.ir.Op.get("relax.call_tir")
    value_of, users = {}, {}

    def used_by(expr, user) -> None:
        if isinstance(expr, relax.Var):
            users.setdefault(expr, []).append(user)
        elif isinstance(expr, relax.Tuple):
            for f in expr.fields:
                used_by(f, user)
        elif isinstance(expr, relax.Call):
            for a in expr.args:
                used_by(a, user)

    for block in func.body.blocks:
        for b in block.bindings:
            if isinstance(b, relax.VarBinding):
                value_of[b.var] = b.value
            used_by(b.value, b.var)
    used_by(func.body.body, None)  # the function's outputs are users too

    def step(var):
        """(kind, value, next var) of the one user of var, or None."""
        if len(users.get(var, [])) != 1:
            return None
        nxt = users[var][0]
        call = value_of.get(nxt)
        if not isinstance(call, relax.Call):
            return None
        if call.op == call_tir:
            name = re.sub(r"\d+$", "", call.args[0].name_hint)
            args = list(call.args[1].fields)
            if name in ("maximum", "minimum") and len(args) == 2 and args[0].same_as(var):
                v = _scalar(args[1])
                return (name, v, nxt) if v is not None else None
            return None
        args = list(call.args)
        if call.op == ops["relu"] and args[0].same_as(var):
            return ("maximum", 0.0, nxt)
        if call.op == ops["clip"] and args[0].same_as(var):
            lo, hi = (float(a.value) if hasattr(a, "value") else None for a in args[1:3])
            return ("clip", (lo, hi), nxt) if lo is not None and hi is not None else None
        if call.op in (ops["maximum"], ops["minimum"], ops["add"]) and len(args) == 2:
            other = args[1] if args[0].same_as(var) else args[0]
            kind = call.op.name.split(".")[-1]
            if kind == "add" and isinstance(other, tvm.ir.expr.Constant):
                return ("add", other.value.numpy(), nxt)
            if kind == "add" and isinstance(other, relax.Var) and _same_shape(other, var):
                return ("residual", (other, args[1].same_as(var)), nxt)
            v = _scalar(other)
            return (kind, v, nxt) if v is not None and kind != "add" else None
        return None

    found = {}
    for var, call in value_of.items():
        if not (isinstance(call, relax.Call) and call.op == conv_op):
            continue
        o = int(var.ty.shape.values[1]) if var.ty.shape is not None else None
        ep, cur = Epilogue(end=call), var
        s = step(cur)
        if s and s[0] == "add" and o and s[1].size == o and s[1].shape in ((1, o, 1, 1), (o, 1, 1)):
            ep.bias, ep.end, cur = s[1].reshape(o).astype(np.float32), value_of[s[2]], s[2]
            s = step(cur)
        if s and s[0] == "residual":
            (ep.residual, ep.residual_first), ep.end, cur = s[1], value_of[s[2]], s[2]
            s = step(cur)
        while s and s[0] in ("maximum", "minimum", "clip"):
            if s[0] == "maximum":
                ep.lo = max(ep.lo, s[1])
            elif s[0] == "minimum":
                ep.hi = min(ep.hi, s[1])
            else:
                ep.lo, ep.hi = max(ep.lo, s[1][0]), min(ep.hi, s[1][1])
            ep.end, cur = value_of[s[2]], s[2]
            s = step(cur)
        found[call] = ep
    return found


def sparsify(mod, target, decide, dense: bool = False, decide_conv=None):
    """Replace the 1x1 convs ``decide(candidate, weight2d, n, c, pixels, epilogue)`` picks
    "sparse" by ``call_tir`` of ``pointwise_nchw``, and (where ``decide_conv(candidate, weight,
    shape, epilogue)`` is given and picks "kernel") the depthwise and KxK convs by
    ``tvm_conv.conv_nchw``, with the bias add and ReLU/ReLU6 clamp that follow each fused into
    the kernel (``epilogues``); returns (module, candidates in graph order: sparse ``Candidate``
    and ``tvm_conv.ConvCandidate``). With ``dense`` a weight without zero blocks is a
    candidate too (the kernel's dense baseline)."""
    import tvm
    from tvm import relax

    conv = tvm.ir.Op.get("relax.nn.conv2d")
    lanes = lanes_for(target)
    candidates: list[Candidate] = []
    mod = relax.transform.FoldConstant()(mod)  # bias reshapes and clamp bounds as constants
    chains = {}
    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            chains.update(epilogues(func, conv))
    ends = {ep.end.__chandle__(): (call, ep) for call, ep in chains.items()}

    def _placeholder():
        return relax.const(np.zeros(1, np.float32))

    def replace(call, ep: Epilogue, x, res):
        """The kernel call for conv ``call`` (input ``x`` and residual ``res``, already
        rewritten) with ``ep`` fused; None where the conv stays dense."""
        w = call.args[1].value.numpy() if isinstance(call.args[1], tvm.ir.expr.Constant) else None
        direct = tvm_conv.conv_shape(call) if w is not None and decide_conv else None
        if direct is not None:
            return replace_conv(w, direct, ep, x, res)
        shape = call.args[0].ty.shape
        if w is None or w.shape[2:] != (1, 1) or not _is_plain_pointwise(call) or shape is None:
            return None
        try:
            n, c, h, wd = (int(d) for d in shape.values)
        except TypeError:  # symbolic dims
            return None
        w2d = w.reshape(w.shape[0], -1)
        r = block_rows(w2d, dense=dense)
        if r is None:
            return None
        blocks = (w2d != 0).reshape(w.shape[0] // r, r, -1).any(1)
        cand = Candidate(weight_key(w2d), tuple(w.shape), h * wd, r, float(blocks.mean()))
        candidates.append(cand)
        cand.choice = decide(cand, w2d, n, c, h * wd, ep)
        if cand.choice != "sparse":
            return None
        o = w.shape[0]
        data, indices, indptr = pack(w2d, r)
        bias = ep.bias if ep.bias is not None else np.zeros(o, np.float32)
        kernel = pointwise_nchw(
            n, c, o, h * wd, r, len(indices), lanes, ep.lo, ep.hi, res is not None
        )
        name = f"effc_bsr_pointwise_{len(candidates)}"
        gv = rewriter.builder_.add_func(kernel.with_attr("global_symbol", name), name)
        args = [relax.op.reshape(x, (n, c, h * wd)), relax.const(data), relax.const(indices)]
        args += [relax.const(indptr), relax.const(bias)]
        args.append(relax.op.reshape(res, (n, o, h * wd)) if res is not None else _placeholder())
        out = relax.call_tir(gv, args, relax.TensorType((n, o, h * wd), "float32"))
        return relax.op.reshape(out, (n, o, h, wd))

    def replace_conv(w, shape, ep: Epilogue, x, res):
        n, c, h, wd, o, k, s, p, groups = shape
        cand = tvm_conv.ConvCandidate(weight_key(w), tuple(w.shape), groups, s, p, h * wd)
        candidates.append(cand)
        cand.choice = decide_conv(cand, w, shape, ep)
        if cand.choice != "kernel":
            return None
        kernel = tvm_conv.conv_nchw(
            n, c, h, wd, o, k, s, p, groups, lanes, ep.lo, ep.hi, res is not None
        )
        name = f"effc_conv_{len(candidates)}"
        gv = rewriter.builder_.add_func(kernel.with_attr("global_symbol", name), name)
        bias = ep.bias if ep.bias is not None else np.zeros(o, np.float32)
        args = [x, relax.const(np.ascontiguousarray(w)), relax.const(bias)]
        args.append(res if res is not None else _placeholder())
        oh, ow = (h + 2 * p - k) // s + 1, (wd + 2 * p - k) // s + 1
        return relax.call_tir(gv, args, relax.TensorType((n, o, oh, ow), "float32"))

    @relax.expr_functor.mutator
    class Rewriter(relax.PyExprMutator):
        def __init__(self, module):
            super().__init__(module)

        def visit_call_(self, call):
            hit = ends.get(call.__chandle__())
            new = super().visit_call_(call)
            if hit is None:
                return new
            conv_call, ep = hit
            res = self.visit_expr(ep.residual) if ep.residual is not None else None
            try:
                fused = replace(conv_call, ep, self.visit_expr(conv_call.args[0]), res)
            except Exception as e:  # TVM's FFI would turn it into a RuntimeError
                raised.append(e)
                return new
            return new if fused is None else fused

    raised: list[Exception] = []
    rewriter = Rewriter(mod)
    for gv, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
            if raised:  # a decision failed (its own error type, e.g. a bad tuning database)
                raise raised[0]
    # the replaced convs, bias adds and clamps have no users left; a kernel's (n, o, pixels)
    # output reshaped to NCHW and back for the next sparse kernel is one reshape less (fused
    # together, TVM would copy the tensor)
    mod = relax.transform.DeadCodeElimination()(rewriter.builder_.get())
    return relax.transform.RemoveRedundantReshape()(mod), candidates


def pointwise_module(w2d, n, c, pixels, ep=None):
    """A relax module of one 1x1 conv (``w2d`` as its weight, ``ep`` its epilogue as
    ``tvm_conv.conv_module`` writes it) on an (n, c, h, w) input with h * w = pixels: what a
    layer's dense and sparse forms are measured on. Returns (module, input shapes)."""
    o = w2d.shape[0]
    side = int(round(pixels**0.5))
    h, wd = (side, side) if side * side == pixels else (1, pixels)
    return tvm_conv.conv_module(w2d.reshape(o, c, 1, 1), n, h, wd, ep=ep)


def measure_pointwise(
    build, target, w2d, n, c, pixels, r, ep=None, repeat=20
) -> tuple[float, float]:
    """(dense µs, sparse µs) of one layer with its epilogue ``ep`` (bias, residual, clamp) on
    this machine: TVM's conv2d built alone by ``build(module)`` (the target's build, with its
    tuning database, which covers the layer where the module has the model's form) and the
    sparse kernel, medians of ``repeat`` timings of 10 runs."""
    o = w2d.shape[0]
    mod, shapes = pointwise_module(w2d, n, c, pixels, ep)
    dense_us, xs = tvm_conv.time_dense(build, mod, shapes, ep, repeat)
    data, indices, indptr = pack(w2d, r)
    lo, hi = (ep.lo, ep.hi) if ep is not None else (-math.inf, math.inf)
    fused = ep is not None and ep.residual is not None
    kernel = pointwise_nchw(n, c, o, pixels, r, len(indices), lanes_for(target), lo, hi, fused)
    bias = ep.bias if ep is not None and ep.bias is not None else np.zeros(o, np.float32)
    res = xs[1].reshape(n, o, pixels) if fused else np.zeros(1, np.float32)
    inputs = [xs[0].reshape(n, c, pixels), data, indices, indptr, bias, res]
    return dense_us, tvm_conv.time_kernel(kernel, target, inputs, (n, o, pixels), repeat)
