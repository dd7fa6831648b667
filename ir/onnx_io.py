"""Safe ONNX loading and atomic saving.

Loading validates before any tensor data is read: the file exists and is a file, is not a Git
LFS pointer, parses as ModelProto, passes the ONNX checker, and every external-data reference
stays inside the model's folder (no absolute paths, no ``..``, no symlink that leads out) and
lies within its file. Saving writes to a temporary file in the destination folder and renames
it, so a failure never leaves a partial model; external data is written beside the model.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from effc.errors import InputError

LFS_MAGIC = b"version https://git-lfs.github.com/spec/"
# Protobuf cannot hold more than 2 GiB; keep a margin and move weights to external data past it.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def check_model_file(path: Path) -> None:
    """Raise InputError unless ``path`` names a readable regular file."""
    if not path.exists():
        raise InputError(f"no such file: {path}")
    if path.is_dir():
        raise InputError(f"expected a model file, got a folder: {path}")
    with open(path, "rb") as f:
        head = f.read(len(LFS_MAGIC))
    if head == LFS_MAGIC:
        raise InputError(
            f"{path} is a Git LFS pointer, not the model itself: run `git lfs pull` first"
        )


def _tensors_with_external_data(proto: onnx.ModelProto):
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    return [t for t in _get_all_tensors(proto) if uses_external_data(t)]


def validate_external_data(proto: onnx.ModelProto, base_dir: Path) -> None:
    """Every external reference must resolve to a file inside ``base_dir`` and fit in it."""
    base = base_dir.resolve()
    for tensor in _tensors_with_external_data(proto):
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        where = f"tensor {tensor.name!r} points to external data {location!r}"
        if not location:
            raise InputError(f"tensor {tensor.name!r} uses external data but names no file")
        if os.path.isabs(location) or location.startswith(("/", "\\")):
            raise InputError(f"{where}: absolute paths are refused")
        if ".." in Path(location).parts:
            raise InputError(f"{where}: paths leaving the model folder are refused")
        target = (base / location).resolve()
        if base not in target.parents:
            raise InputError(f"{where}: it resolves outside the model folder ({target})")
        if not target.is_file():
            raise InputError(f"{where}: no such file in the model folder")
        offset = int(info.get("offset", 0))
        length = int(info.get("length", -1))
        size = target.stat().st_size
        if offset < 0 or offset > size or (length >= 0 and offset + length > size):
            raise InputError(f"{where}: offset {offset} + length {length} exceeds its size {size}")


def load_onnx(path: str | os.PathLike) -> ir.Model:
    """Load an ONNX file into onnx_ir after validating it (see module docstring)."""
    path = Path(path)
    check_model_file(path)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError) as e:
        raise InputError(f"{path} is not a valid ONNX file ({type(e).__name__}: {e})") from e
    if not proto.HasField("graph") or proto.ir_version <= 0:
        raise InputError(f"{path} is not a valid ONNX file (no graph or no IR version)")
    validate_external_data(proto, path.parent)
    try:
        # With external data the checker needs the path to find it (after the checks above).
        onnx.checker.check_model(str(path) if _tensors_with_external_data(proto) else proto)
    except onnx.checker.ValidationError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"{path} is not a valid ONNX model: {first}") from e
    model = ir.serde.deserialize_model(proto)
    ir.external_data.set_base_dir(model.graph, path.parent)
    if _tensors_with_external_data(proto):  # saved the same way (save_onnx)
        model.meta[EXTERNAL_SOURCE] = True
    return model


EXTERNAL_SOURCE = "effc.external_data_source"  # model.meta key: loaded from external data


def initializer_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value)


def save_onnx(model: ir.Model, path: str | os.PathLike, external: bool | None = None) -> list[Path]:
    """Write ``model`` to ``path`` atomically; return the files written.

    ``external=None`` moves weights to ``<name>.data`` beside the model when the model would
    exceed protobuf's 2 GiB limit or its weights came from external data (a user's external-data
    file stays external, copied: never referenced from where it was; a model loaded from external
    data is saved with external data even when its passes replaced every weight, so no protobuf
    of all the weights is built in memory). External data always lands
    in the model's own folder. Files are written into a temporary folder beside ``path`` and
    renamed into place.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if external is None:
        external = (
            model.meta.get(EXTERNAL_SOURCE, False)
            or initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD
            or any(
                isinstance(v.const_value, ir.ExternalTensor)
                for v in model.graph.initializers.values()
            )
        )
    data_name = path.name + ".data"
    with tempfile.TemporaryDirectory(prefix=".effc-", dir=path.parent) as tmp:
        tmp_model = Path(tmp) / path.name
        ir.save(model, tmp_model, external_data=data_name if external else None)
        written = [path]
        if external:
            os.replace(Path(tmp) / data_name, path.parent / data_name)
            written.append(path.parent / data_name)
        os.replace(tmp_model, path)
    return written


def deduplicate_initializers(model: ir.Model, min_elements: int = 0) -> int:
    """Point every use of an initializer at the first one with the same dtype, shape and bytes
    (graph inputs and outputs left alone; ``min_elements``: only tensors of at least that many
    elements and two dims, i.e. weights, not biases or norm vectors); returns how many went. Exporters write a parameter
    shared by several modules once per use, and some of those copies are strided views (which
    onnx_ir's own hashed pass refuses), so the bytes are hashed from contiguous copies."""
    graph = model.graph
    seen: dict[tuple, list[ir.Value]] = {}
    removed = 0
    for name, value in list(graph.initializers.items()):
        if value.const_value is None or value.is_graph_input() or value.is_graph_output():
            continue
        if any(u.node.graph is not graph for u in value.uses()):
            continue  # read inside an If/Loop body, where a local value may shadow its name
        if isinstance(value.const_value, ir.ExternalTensor):
            continue  # not read into memory for this
        shape = value.const_value.shape
        if min_elements and (len(shape) < 2 or value.const_value.size < min_elements):
            continue
        array = np.ascontiguousarray(value.const_value.numpy())
        key = (str(array.dtype), array.shape, hashlib.sha256(array.tobytes()).hexdigest())
        for first in seen.get(key, []):
            if np.array_equal(np.asarray(first.const_value.numpy()), array):
                value.replace_all_uses_with(first)
                graph.initializers.pop(name)
                removed += 1
                break
        else:
            seen.setdefault(key, []).append(value)
    return removed
