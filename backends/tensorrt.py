"""The TensorRT target: TensorRT-ready ONNX (TensorRT 10 and newer), and an engine build.

``legalization()`` appends the passes that make the graph TensorRT-friendly (shown in the
report like any other pass): LayerNorm in its fused / transpose-free exact form, cleanup and
fusion, then ``tensorrt-legalize`` (opset, int4/int8 block-quantized weights as
DequantizeLinear(block_size), static shapes, op-table warnings). Activation Q/DQ for the int8
path comes from ``quantize-activations`` in the user's pipeline.

The artifact holds ``model.onnx``; ``build_engine`` turns it into a serialized engine with the
TensorRT Python API (fp16/int8 flags, workspace limit, timing cache). That code needs the
``tensorrt`` package and an NVIDIA GPU: where either is missing it raises a one-line error
naming what is missing. It has not been run on this project's machines (no GPU, no TensorRT);
``effc run`` on an artifact without an engine executes the TensorRT-ready ONNX under
onnxruntime, the reference.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx_ir as ir

import effc.backends.onnxruntime as ort_backend
from effc.errors import UnsupportedError

NAME = "tensorrt"
MODEL_FILE = "model.onnx"
ENGINE_FILE = "model.engine"
log = logging.getLogger(__name__)


def legalization() -> list[str]:
    # the reduce form: TensorRT reduces over the channel axis natively (timing the forms on
    # onnxruntime CPU says nothing about the GPU)
    return ["layernorm{form=reduce}", "fixpoint(cleanup,fuse)", "tensorrt-legalize"]


def lower(model: ir.Model, out_dir: Path, engine: str | None = None) -> list[Path]:
    """The TensorRT-ready ONNX, and with ``engine`` ("fp32", "fp16" or "int8") its engine."""
    files = ort_backend.lower(model, out_dir)
    if engine is not None:
        if engine not in ("fp32", "fp16", "int8"):
            raise UnsupportedError(f"engine precision must be fp32, fp16 or int8, not {engine!r}")
        files.append(
            build_engine(
                out_dir / MODEL_FILE,
                out_dir / ENGINE_FILE,
                fp16=engine != "fp32",
                int8=engine == "int8",
            )
        )
    return files


def _tensorrt():
    try:
        import tensorrt
    except ImportError as e:
        raise UnsupportedError(
            "building a TensorRT engine needs the tensorrt package (pip install 'effc[tensorrt]') "
            "and an NVIDIA GPU; the TensorRT-ready ONNX is usable without them"
        ) from e
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = True  # let TensorRT itself report a missing device
    if not has_gpu:
        raise UnsupportedError(
            "building a TensorRT engine needs an NVIDIA GPU (CUDA) and none was found"
        )
    return tensorrt


def build_engine(
    onnx_path: Path,
    engine_path: Path,
    fp16: bool = True,
    int8: bool = False,
    workspace_gib: float = 4.0,
    timing_cache: Path | None = None,
) -> Path:
    """Parse ``onnx_path`` and serialize an engine to ``engine_path``. int8 expects explicit
    Q/DQ in the graph (``quantize-activations``); no calibrator is used."""
    trt = _tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UnsupportedError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if int8:
        config.set_flag(trt.BuilderFlag.INT8)
    cache = None
    if timing_cache is not None:
        blob = timing_cache.read_bytes() if timing_cache.is_file() else b""
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, ignore_mismatch=False)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise UnsupportedError("TensorRT failed to build the engine (see its log above)")
    engine_path.write_bytes(bytes(engine))
    if cache is not None:
        timing_cache.write_bytes(bytes(cache.serialize()))
    return engine_path


def _run_engine(engine_path: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import torch

    trt = _tensorrt()
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
    context = engine.create_execution_context()
    buffers, outputs = {}, {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
            t = torch.from_numpy(np.asarray(inputs[name], order="C")).cuda()  # 0-d stays 0-d
            context.set_input_shape(name, tuple(t.shape))
            buffers[name] = t
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
            dtype = torch.from_numpy(np.zeros(0, trt.nptype(engine.get_tensor_dtype(name)))).dtype
            buffers[name] = outputs[name] = torch.empty(
                tuple(context.get_tensor_shape(name)), dtype=dtype, device="cuda"
            )
    for name, t in buffers.items():
        context.set_tensor_address(name, t.data_ptr())
    stream = torch.cuda.Stream()
    context.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    return {k: v.cpu().numpy() for k, v in outputs.items()}


def run(
    out_dir: Path, inputs: dict[str, np.ndarray], threads: int | None = None
) -> dict[str, np.ndarray]:
    """The engine if the artifact has one, else the TensorRT-ready ONNX under onnxruntime."""
    engine = out_dir / ENGINE_FILE
    if engine.is_file():
        return _run_engine(engine, inputs)
    log.info("no %s in %s: running the TensorRT-ready ONNX under onnxruntime", ENGINE_FILE, out_dir)
    return ort_backend.run(out_dir, inputs, threads, optimize="basic")
