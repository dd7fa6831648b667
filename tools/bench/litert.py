"""LiteRT (TensorFlow Lite) with its XNNPACK delegate as a baseline engine for the mobile CNN
bench: effc's ONNX graph of a MobileNet written as a ``.tflite`` flatbuffer (NHWC), with the 1x1
convolutions' weights stored sparse (``DENSIFY``) so XNNPACK may take its sparse path.

No ONNX-to-TFLite converter installs here without TensorFlow, so this writes the flatbuffer
itself (``ai_edge_litert``'s schema classes) for the operators a MobileNet graph holds after
effc's cleanup: Conv (dense, depthwise), Clip(0, 6), Add, ReduceMean over the spatial axes,
Reshape of a 1x1 map and Gemm. Anything else is refused with a one-line error.

XNNPACK's sparse inference (Fast Sparse ConvNets, NCHW kernels) applies only where the weights
are stored sparse and at least 2/3 of the 1x1 convolutions' weights across the subgraph are
zeros, the subgraph starting with a 3x3 stride-2 convolution of 3 channels padded by 1 and
ending in a spatial mean; below that it runs its dense NHWC kernels. Convolutions here are
written as an explicit PAD and a VALID convolution, which XNNPACK fuses into one padded
convolution (TFLite's SAME padding of a stride-2 convolution pads 0/1, not 1/1).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir

from effc.errors import UnsupportedError

RELU6 = (0.0, 6.0)


def _schema():
    try:
        from ai_edge_litert import schema_py_generated as s
    except ImportError as e:  # pragma: no cover - the bench extra installs it
        raise UnsupportedError("LiteRT is not installed (pip install 'effc[litert]')") from e
    return s


def zero_fraction_1x1(model: ir.Model) -> float:
    """The fraction of zeros over all 1x1 group-1 convolutions' weights (XNNPACK's rule for
    its sparse path asks for at least 2/3)."""
    zeros = total = 0
    for node in model.graph:
        if node.op_type == "Conv" and _attr(node, "group", 1) == 1:
            w = node.inputs[1].const_value.numpy()
            if w.shape[2:] == (1, 1):
                zeros += int((w == 0).sum())
                total += w.size
    return zeros / max(total, 1)


def _attr(node: ir.Node, name: str, default):
    a = node.attributes.get(name)
    return default if a is None else a.value


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


class _Writer:
    def __init__(self, s, sparse: bool):
        self.s = s
        self.sparse = sparse
        self.tensors: list = []
        self.buffers = [s.BufferT()]  # buffer 0: the empty sentinel
        self.ops: list = []
        self.codes: dict[int, int] = {}
        self.shapes: dict[int, tuple[int, ...]] = {}

    def tensor(self, name: str, shape, data: np.ndarray | None = None, dtype=None) -> int:
        s = self.s
        t = s.TensorT()
        t.name = name
        t.shape = np.asarray(shape, np.int32)
        t.type = s.TensorType.INT32 if dtype == np.int32 else s.TensorType.FLOAT32
        if data is not None:
            b = s.BufferT()
            b.data = np.frombuffer(np.ascontiguousarray(data).tobytes(), np.uint8)
            self.buffers.append(b)
            t.buffer = len(self.buffers) - 1
        self.tensors.append(t)
        self.shapes[len(self.tensors) - 1] = tuple(int(d) for d in shape)
        return len(self.tensors) - 1

    def sparse_tensor(self, name: str, w: np.ndarray) -> int:
        """A constant stored in TFLite's sparse format (every dimension dense but the last,
        CSR over it), read through a DENSIFY operator; returns the dense tensor."""
        s = self.s
        rows = w.reshape(-1, w.shape[-1])
        kept = rows != 0
        segments = np.concatenate([[0], np.cumsum(kept.sum(1))]).astype(np.int32)
        indices = np.nonzero(kept)[1].astype(np.int32)
        idx = self.tensor(name + "_sparse", w.shape, rows[kept].astype(np.float32))
        meta = []
        for d in w.shape[:-1]:
            m = s.DimensionMetadataT()
            m.format = s.DimensionType.DENSE
            m.denseSize = int(d)
            meta.append(m)
        m = s.DimensionMetadataT()
        m.format = s.DimensionType.SPARSE_CSR
        m.arraySegmentsType = s.SparseIndexVector.Int32Vector
        m.arraySegments = s.Int32VectorT()
        m.arraySegments.values = segments.tolist()
        m.arrayIndicesType = s.SparseIndexVector.Int32Vector
        m.arrayIndices = s.Int32VectorT()
        m.arrayIndices.values = indices.tolist()
        meta.append(m)
        sp = s.SparsityParametersT()
        sp.traversalOrder = list(range(w.ndim))
        sp.dimMetadata = meta
        self.tensors[idx].sparsity = sp
        dense = self.tensor(name, w.shape)
        self.op("DENSIFY", [idx], [dense], "DensifyOptions", self.s.DensifyOptionsT())
        return dense

    def op(self, code: str, inputs, outputs, options_type=None, options=None) -> None:
        s = self.s
        builtin = getattr(s.BuiltinOperator, code)
        self.codes.setdefault(builtin, len(self.codes))
        o = s.OperatorT()
        o.opcodeIndex = self.codes[builtin]
        o.inputs = list(inputs)
        o.outputs = list(outputs)
        if options_type:
            o.builtinOptionsType = getattr(s.BuiltinOptions, options_type)
            o.builtinOptions = options
        self.ops.append(o)

    def finish(self, inputs, outputs) -> bytes:
        import flatbuffers

        s = self.s
        g = s.SubGraphT()
        g.tensors, g.inputs, g.outputs, g.operators = self.tensors, inputs, outputs, self.ops
        g.name = "main"
        m = s.ModelT()
        m.version = 3
        m.description = "written by effc (tools/bench/litert.py)"
        m.subgraphs = [g]
        m.buffers = self.buffers
        codes = []
        for builtin in self.codes:
            oc = s.OperatorCodeT()
            oc.builtinCode = builtin
            oc.deprecatedBuiltinCode = min(builtin, 127)
            oc.version = 1
            codes.append(oc)
        m.operatorCodes = codes
        b = flatbuffers.Builder(1 << 20)
        b.Finish(m.Pack(b), file_identifier=b"TFL3")
        return bytes(b.Output())


def _activation(model_consumers: dict, value: ir.Value):
    """(fused activation, value the op's output stands for): a sole Clip(0, 6) consumer is
    fused as RELU6."""
    users = model_consumers.get(value.name, [])
    if len(users) == 1 and users[0].op_type == "Clip":
        clip = users[0]
        lo, hi = _const(clip.inputs[1]), _const(clip.inputs[2])
        if lo is not None and hi is not None and (float(lo), float(hi)) == RELU6:
            return "RELU6", clip.outputs[0]
    return "NONE", value


def onnx_to_tflite(model: ir.Model, sparse: bool = False) -> bytes:
    """The ``.tflite`` flatbuffer of a MobileNet-style ONNX graph (NCHW in, NHWC inside: the
    input is [N, H, W, C]); with ``sparse``, every 1x1 convolution's weight is stored sparse."""
    s = _schema()
    w = _Writer(s, sparse)
    consumers: dict[str, list[ir.Node]] = {}
    for node in model.graph:
        for v in node.inputs:
            if v is not None:
                consumers.setdefault(v.name, []).append(node)
    names: dict[str, int] = {}
    (x,) = model.graph.inputs
    n, c, h, wd = (int(d) for d in x.shape)
    names[x.name] = w.tensor(x.name, (n, h, wd, c))
    fused: set[str] = set()
    for node in model.graph:
        if node.op_type == "Clip" and node.outputs[0].name in fused:
            continue
        ins = [names.get(v.name) if v is not None else None for v in node.inputs]
        out = node.outputs[0]
        if node.op_type == "Conv":
            act, target = _fuse(consumers, fused, out)
            names[target.name] = _conv(w, node, ins[0], act, target)
        elif node.op_type == "Clip":
            lo, hi = _const(node.inputs[1]), _const(node.inputs[2])
            if lo is None or hi is None or (float(lo), float(hi)) != RELU6:
                raise UnsupportedError(f"{node.name}: only Clip(0, 6) is written to TFLite")
            names[out.name] = w.tensor(out.name, w.shapes[ins[0]])
            w.op("RELU6", [ins[0]], [names[out.name]])
        elif node.op_type == "Add":
            act, target = _fuse(consumers, fused, out)
            opts = s.AddOptionsT()
            opts.fusedActivationFunction = getattr(s.ActivationFunctionType, act)
            names[target.name] = w.tensor(target.name, w.shapes[ins[0]])
            w.op("ADD", ins[:2], [names[target.name]], "AddOptions", opts)
        elif node.op_type == "ReduceMean":
            axes = _const(node.inputs[1])
            if axes is None or sorted(int(a) % 4 for a in axes) != [2, 3]:
                raise UnsupportedError(f"{node.name}: only a spatial ReduceMean is written")
            nn_, _, _, cc = w.shapes[ins[0]]
            keep = bool(_attr(node, "keepdims", 1))
            opts = s.ReducerOptionsT()
            opts.keepDims = keep
            shape = (nn_, 1, 1, cc) if keep else (nn_, cc)
            names[out.name] = w.tensor(out.name, shape)
            axes_t = w.tensor(out.name + "_axes", (2,), np.array([1, 2], np.int32), np.int32)
            w.op("MEAN", [ins[0], axes_t], [names[out.name]], "ReducerOptions", opts)
        elif node.op_type in ("Reshape", "Flatten"):
            shape = w.shapes[ins[0]]
            if len(shape) == 4 and shape[1:3] != (1, 1):
                raise UnsupportedError(f"{node.name}: only a 1x1 map is flattened in TFLite")
            flat = (shape[0], int(np.prod(shape[1:])))
            opts = s.ReshapeOptionsT()
            opts.newShape = list(flat)
            shape_t = w.tensor(out.name + "_shape", (2,), np.array(flat, np.int32), np.int32)
            names[out.name] = w.tensor(out.name, flat)
            w.op("RESHAPE", [ins[0], shape_t], [names[out.name]], "ReshapeOptions", opts)
        elif node.op_type == "Gemm":
            weight = _const(node.inputs[1])
            if _attr(node, "transA", 0) or weight is None:
                raise UnsupportedError(f"{node.name}: only Gemm(x, W^T + b) is written")
            if not _attr(node, "transB", 0):
                weight = weight.T
            wt = w.tensor(node.inputs[1].name, weight.shape, weight.astype(np.float32))
            bias = _const(node.inputs[2]) if len(node.inputs) > 2 else None
            bt = -1 if bias is None else w.tensor(node.inputs[2].name, bias.shape, bias)
            names[out.name] = w.tensor(out.name, (w.shapes[ins[0]][0], weight.shape[0]))
            opts = s.FullyConnectedOptionsT()
            w.op(
                "FULLY_CONNECTED",
                [ins[0], wt, bt],
                [names[out.name]],
                "FullyConnectedOptions",
                opts,
            )
        else:
            raise UnsupportedError(f"{node.op_type} ({node.name}) is not written to TFLite here")
    outs = [names[v.name] for v in model.graph.outputs]
    return w.finish([names[x.name]], outs)


def _fuse(consumers: dict, fused: set, value: ir.Value):
    """``_activation`` of ``value``, the fused Clip's output recorded in ``fused`` (its node is
    then skipped)."""
    act, target = _activation(consumers, value)
    if target is not value:
        fused.add(target.name)
    return act, target


def _conv(w: _Writer, node: ir.Node, x: int, act: str, target: ir.Value) -> int:
    s = w.s
    weight = _const(node.inputs[1])
    if weight is None:
        raise UnsupportedError(f"{node.name}: a Conv with computed weights is not written")
    bias = _const(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] else None
    if bias is None:
        bias = np.zeros(weight.shape[0], np.float32)
    group = _attr(node, "group", 1)
    stride = tuple(_attr(node, "strides", (1, 1)))
    pads = tuple(_attr(node, "pads", (0, 0, 0, 0)))
    if tuple(_attr(node, "dilations", (1, 1))) != (1, 1):
        raise UnsupportedError(f"{node.name}: dilated convolutions are not written")
    if _attr(node, "auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
        raise UnsupportedError(f"{node.name}: auto_pad is not written")
    n, h, wd, c = w.shapes[x]
    o, ci, kh, kw = weight.shape
    if any(pads):
        t, left, b, r = pads
        spec = np.array([[0, 0], [t, b], [left, r], [0, 0]], np.int32)
        pad_t = w.tensor(node.name + "_pads", (4, 2), spec, np.int32)
        h, wd = h + t + b, wd + left + r
        padded = w.tensor(node.name + "_padded", (n, h, wd, c))
        w.op("PAD", [x, pad_t], [padded], "PadOptions", s.PadOptionsT())
        x = padded
    oh, ow = (h - kh) // stride[0] + 1, (wd - kw) // stride[1] + 1
    out = w.tensor(target.name, (n, oh, ow, o))
    bias_t = w.tensor(node.name + "_bias", (o,), bias.astype(np.float32))
    fused = getattr(s.ActivationFunctionType, act)
    if group == 1:
        filt = weight.transpose(0, 2, 3, 1).astype(np.float32)  # OHWI
        if w.sparse and (kh, kw) == (1, 1):
            wt = w.sparse_tensor(node.inputs[1].name, filt)
        else:
            wt = w.tensor(node.inputs[1].name, filt.shape, filt)
        opts = s.Conv2DOptionsT()
        opts.padding, opts.strideH, opts.strideW = s.Padding.VALID, *stride
        opts.fusedActivationFunction = fused
        w.op("CONV_2D", [x, wt, bias_t], [out], "Conv2DOptions", opts)
    elif group == c == o and ci == 1:
        filt = weight.transpose(1, 2, 3, 0).astype(np.float32)  # 1HWO
        wt = w.tensor(node.inputs[1].name, filt.shape, filt)
        opts = s.DepthwiseConv2DOptionsT()
        opts.padding, opts.strideH, opts.strideW = s.Padding.VALID, *stride
        opts.depthMultiplier = 1
        opts.fusedActivationFunction = fused
        w.op("DEPTHWISE_CONV_2D", [x, wt, bias_t], [out], "DepthwiseConv2DOptions", opts)
    else:
        raise UnsupportedError(f"{node.name}: grouped convolutions are not written")
    return out


def litert_call(model: Path | ir.Model, sparse: bool, x: np.ndarray, threads: int):
    """A callable running the graph (an ONNX file or a model in memory) in LiteRT with its
    default XNNPACK delegate on ``threads`` threads (NCHW ``x`` is fed as NHWC); None where
    LiteRT is not installed."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        return None
    graph = model if isinstance(model, ir.Model) else ir.load(str(model))
    content = onnx_to_tflite(graph, sparse)
    interp = Interpreter(model_content=content, num_threads=threads)
    interp.allocate_tensors()
    inp = interp.get_input_details()[0]["index"]
    out = interp.get_output_details()[0]["index"]
    nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1))

    def call():
        interp.set_tensor(inp, nhwc)
        interp.invoke()
        return interp.get_tensor(out)

    return call
