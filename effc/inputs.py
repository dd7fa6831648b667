"""Random and file inputs for checks and tests (DESIGN.md section 7).

Symbolic dims come from ``--shape name=1x128``; integer inputs whose name says ids are drawn
in ``[0, vocab)``; masks are all ones; everything else is standard normal. Seeds make them
reproducible.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from effc.errors import InputError
from effc.ir.model import InputSpec


def parse_shapes(items: list[str] | None) -> dict[str, list[int]]:
    """``["input_ids=1x128"]`` -> ``{"input_ids": [1, 128]}``."""
    shapes = {}
    for item in items or []:
        name, sep, dims = item.partition("=")
        try:
            if not sep or not name:
                raise ValueError
            shapes[name] = [int(d) for d in dims.lower().split("x")]
            if any(d <= 0 for d in shapes[name]):
                raise ValueError
        except ValueError:
            raise InputError(f"--shape {item!r}: expected NAME=DIMS like input_ids=1x128") from None
    return shapes


def resolve_shape(spec: InputSpec, shapes: dict[str, list[int]]) -> list[int]:
    if spec.name in shapes:
        given = shapes[spec.name]
        if len(given) != len(spec.shape) or any(
            isinstance(d, int) and d != g for d, g in zip(spec.shape, given)
        ):
            raise InputError(
                f"--shape {spec.name}={'x'.join(map(str, given))} does not fit its shape {spec.shape}"
            )
        return given
    if all(isinstance(d, int) for d in spec.shape):
        return list(spec.shape)
    raise InputError(
        f"input '{spec.name}' has symbolic dims {spec.shape}; pass --shape {spec.name}="
        + "x".join(str(d) if isinstance(d, int) else "N" for d in spec.shape)
    )


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


def check_inputs(specs: list[InputSpec], inputs: dict[str, np.ndarray]) -> None:
    """Names, ranks, static dims and dtypes of ``inputs`` must match the model's."""
    expected = {s.name: s for s in specs}
    if set(inputs) != set(expected):
        raise InputError(
            f"inputs {sorted(inputs)} do not match the model's inputs {sorted(expected)}"
        )
    for name, arr in inputs.items():
        spec = expected[name]
        if arr.ndim != len(spec.shape) or any(
            isinstance(d, int) and d != a for d, a in zip(spec.shape, arr.shape)
        ):
            raise InputError(
                f"input '{name}' has shape {list(arr.shape)}, the model wants {spec.shape}"
            )
        if arr.dtype != np.dtype(spec.dtype):
            raise InputError(f"input '{name}' has dtype {arr.dtype}, the model wants {spec.dtype}")
