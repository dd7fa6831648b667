"""Random and file inputs for checks and tests (DESIGN.md section 7).

Symbolic dims come from ``--shape name=1x128``, else from a documented default rule (batch 1,
image spatial 64, other dims 16); integer inputs whose name says ids are drawn in ``[0, vocab)``;
masks are all ones; float NCHW images are uniform in [0, 1]; everything else is standard normal.
Seeds make them reproducible.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from effc.errors import InputError
from effc.ir.model import InputSpec

# The documented rule for dims a model leaves symbolic (``None``, a name, or -1) when no
# ``--shape`` fixes them: the batch (first) dim 1; the spatial dims of an NCHW image 64 and its
# channels 3; every other dim (sequence length, ...) 16.
DEFAULT_BATCH, DEFAULT_SPATIAL, DEFAULT_CHANNELS, DEFAULT_OTHER = 1, 64, 3, 16


def _dims(text: str) -> list[int]:
    dims = []
    for d in text.lower().split("x"):
        dims.append(-1 if d in ("?", "-1") else int(d))
        if dims[-1] == 0 or dims[-1] < -1:
            raise ValueError
    return dims


def parse_shapes(items: list[str] | None) -> dict[str, list[int]]:
    """``["input_ids=1x128"]`` -> ``{"input_ids": [1, 128]}``; a dim written ``?`` or ``-1`` is
    left to the default rule (``DEFAULT_*``)."""
    shapes = {}
    for item in items or []:
        name, sep, dims = item.partition("=")
        try:
            if not sep or not name:
                raise ValueError
            shapes[name] = _dims(dims)
        except ValueError:
            raise InputError(
                f"--shape {item!r}: expected NAME=DIMS like input_ids=1x128 (? or -1 for a dim "
                "to leave to the default)"
            ) from None
    return shapes


def _static(d) -> bool:
    return isinstance(d, int) and d > 0


def is_image(spec: InputSpec) -> bool:
    """A float NCHW input with 1, 3 or 4 channels (or unknown channels): values in [0, 1]."""
    float_input = np.issubdtype(np.dtype(spec.dtype), np.floating)
    return (
        float_input
        and len(spec.shape) == 4
        and spec.shape[1] in (1, 3, 4)
        or (float_input and len(spec.shape) == 4 and not _static(spec.shape[1]))
    )


def default_dim(spec: InputSpec, i: int) -> int:
    if i == 0:
        return DEFAULT_BATCH
    if is_image(spec):
        return DEFAULT_CHANNELS if i == 1 else DEFAULT_SPATIAL
    return DEFAULT_OTHER


def resolve_shape(spec: InputSpec, shapes: dict[str, list[int]]) -> list[int]:
    """Concrete dims for ``spec``: its static dims, then ``--shape``, then the default rule."""
    given = shapes.get(spec.name)
    if given is not None:
        if len(given) != len(spec.shape) or any(
            _static(d) and g != -1 and d != g for d, g in zip(spec.shape, given)
        ):
            raise InputError(
                f"--shape {spec.name}={'x'.join(map(str, given))} does not fit its shape {spec.shape}"
            )
    else:
        given = [-1] * len(spec.shape)
    return [
        d if _static(d) else (g if g != -1 else default_dim(spec, i))
        for i, (d, g) in enumerate(zip(spec.shape, given))
    ]


def describe(specs: list[InputSpec], shapes: dict | None = None) -> list[str]:
    """One line per input: the concrete shape random inputs get, which dims the default rule
    chose, and the value range (what the report says of its verification inputs)."""
    lines = []
    for spec in specs:
        shape = resolve_shape(spec, shapes or {})
        given = (shapes or {}).get(spec.name, [-1] * len(spec.shape))
        chosen = [
            i for i, (d, g) in enumerate(zip(spec.shape, given)) if not _static(d) and g == -1
        ]
        dtype = np.dtype(spec.dtype)
        if "mask" in spec.name.lower() or dtype == np.bool_:
            values = "all ones (mask)"
        elif np.issubdtype(dtype, np.integer):
            values = "token ids in range" if "ids" in spec.name.lower() else "integers in [0, 2)"
        else:
            values = "uniform in [0, 1] (image)" if is_image(spec) else "standard normal"
        line = f"{spec.name}: {spec.dtype} {'x'.join(map(str, shape))}, {values}"
        if chosen:
            line += f"; dims {chosen} of {spec.shape} by the default rule (--shape to choose)"
        lines.append(line)
    return lines


def random_inputs(
    specs: list[InputSpec], seed: int = 0, shapes: dict | None = None, vocab: int | None = None
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for spec in specs:
        shape = resolve_shape(spec, shapes or {})
        dtype = np.dtype(spec.dtype)
        if "mask" in spec.name.lower():
            out[spec.name] = np.ones(shape, dtype)
        elif np.issubdtype(dtype, np.integer):
            high = vocab if (vocab and "ids" in spec.name.lower()) else 2
            out[spec.name] = rng.integers(0, high, size=shape).astype(dtype)
        elif dtype == np.bool_:
            out[spec.name] = np.ones(shape, dtype)
        elif is_image(spec):
            out[spec.name] = rng.random(shape).astype(dtype)
        else:
            out[spec.name] = rng.standard_normal(shape).astype(dtype)
    return out


def load_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Read named arrays from ``.npz`` without unpickling anything."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no such inputs file: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (ValueError, OSError, zipfile.BadZipFile) as e:
        raise InputError(f"{path} is not a readable .npz of arrays ({e})") from e


def check_inputs(specs: list[InputSpec], inputs: dict[str, np.ndarray], sizes: bool = True) -> None:
    """Names, ranks, static dims (unless ``sizes`` is false: a torch module's example sizes are
    not its only ones) and dtypes of ``inputs`` must match the model's."""
    expected = {s.name: s for s in specs}
    if set(inputs) != set(expected):
        raise InputError(
            f"inputs {sorted(inputs)} do not match the model's inputs {sorted(expected)}"
        )
    for name, arr in inputs.items():
        spec = expected[name]
        if arr.ndim != len(spec.shape) or any(
            sizes and _static(d) and d != a for d, a in zip(spec.shape, arr.shape)
        ):
            raise InputError(
                f"input '{name}' has shape {list(arr.shape)}, the model wants {spec.shape}"
            )
        if _dtype_name(arr.dtype) != _dtype_name(spec.dtype):
            raise InputError(
                f"input '{name}' has dtype {_dtype_name(arr.dtype)}, the model wants "
                f"{_dtype_name(spec.dtype)}"
            )


def as_arrays(sample: dict) -> dict:
    """A sample with its torch tensors as numpy arrays (bfloat16 ones, which numpy lacks, stay
    tensors): the Python API takes either."""
    return {
        k: v.detach().cpu().numpy()
        if hasattr(v, "detach") and str(v.dtype) != "torch.bfloat16"
        else v
        for k, v in sample.items()
    }


def _dtype_name(dtype) -> str:
    """A numpy or torch dtype (or its name) by name: torch.float32 and np.float32 are both
    'float32' (calibration samples may be torch tensors)."""
    return str(dtype).removeprefix("torch.")
