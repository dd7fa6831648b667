"""onnxruntime sessions for in-memory models: the reference executor of every check.

Custom-op domains (effc's BSR kernels) register a library here (``register_domain``) from the
layer that defines them, so a session for a model that uses such a domain loads its ops without
this module knowing them."""

from __future__ import annotations

import os
from collections.abc import Callable

import onnx_ir as ir
import onnxruntime as ort

from effc.errors import InputError

_LEVELS = {
    True: ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    False: ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    # semantics-preserving rewrites only: the extended level fuses e.g. DequantizeLinear(int4) +
    # MatMul into MatMulNBits, whose arithmetic differs from the graph's by up to ~1e-1
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
}
# domain -> a function returning the path of the custom-op library that implements it
_DOMAINS: dict[str, Callable[[], str]] = {}


def register_domain(domain: str, library: Callable[[], str]) -> None:
    """Sessions for models that import ``domain`` load the custom-op library ``library()``."""
    _DOMAINS[domain] = library


def session_options(
    threads: int | None = None, optimize: bool | str = True, spinning: bool = True
) -> ort.SessionOptions:
    """``spinning=False`` stops the intra-op threads from spinning after a call: where several
    sessions are timed in turn, a spinning pool takes cores from the next session (MiniLM at 6
    and 3 blocks, 2 threads: 27 against 22 ms with spinning, 20 against 10 ms without)."""
    opts = ort.SessionOptions()
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.intra_op_num_threads = threads or int(os.environ.get("EFFC_THREADS", "2"))
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    opts.graph_optimization_level = _LEVELS[optimize]
    return opts


def custom_op_libraries(domains) -> list[str]:
    """The libraries of the registered custom domains among ``domains``."""
    return [_DOMAINS[d]() for d in domains if d in _DOMAINS]


def open_session(model: str | bytes, opts: ort.SessionOptions, domains=()) -> ort.InferenceSession:
    """An onnxruntime CPU session for a model file path or serialized bytes; ``domains``: the
    custom domains the model imports (their libraries are loaded). Load failures are user errors
    (the model is what onnxruntime refuses)."""
    for lib in custom_op_libraries(domains):
        opts.register_custom_ops_library(lib)
    try:
        return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"onnxruntime cannot load the model: {first}") from e


def session_for(
    model: ir.Model, threads: int | None = None, optimize: bool | str = True
) -> ort.InferenceSession:
    """An onnxruntime session for an in-memory model; ``optimize``: True (all of onnxruntime's
    graph optimizations), ``"basic"`` (exact rewrites only: the reference semantics) or False
    (none)."""
    proto = ir.serde.serialize_model(model)
    opts = session_options(threads, optimize)
    folders = external_data_folders(model)
    if len(folders) > 1:
        raise InputError(f"the model's external data lies in several folders: {sorted(folders)}")
    if folders:  # weights the serialized bytes reference: read them from the model's folder
        opts.add_session_config_entry(
            "session.model_external_initializers_file_folder_path", folders.pop()
        )
    return open_session(proto.SerializeToString(), opts, model.opset_imports)


def external_data_folders(model: ir.Model) -> set[str]:
    """The folders of the external-data files the model's initializers still live in."""
    return {
        str(v.const_value.base_dir)
        for v in model.graph.initializers.values()
        if isinstance(v.const_value, ir.ExternalTensor)
    }
