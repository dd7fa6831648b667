"""Golden-file checks for users' CI: hold an exported graph to op counts, a structure digest,
per-weight sparsity and outputs on fixed inputs, within tolerances.

    from effc.testing import assert_golden
    def test_export():
        assert_golden("build/model.onnx", "tests/golden/model.json", rtol=1e-4, atol=1e-5)

Write or refresh the golden file with ``EFFC_UPDATE_GOLDEN=1 pytest ...`` or
``effc check build/model.onnx --golden tests/golden/model.json --update``.

Golden file (JSON, ``format: effc-golden``, ``version: 1``): ``op_counts`` (op -> count),
``structure_digest`` (sha256 over ops and edges in graph order, independent of value names and
weight values), ``sparsity`` (weight site -> fraction of zeros), ``rtol``/``atol``, ``inputs``
(name -> shape, dtype, values) and ``outputs`` (shape, dtype, values; outputs larger than
65,536 elements store every ``stride``-th value).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from effc.inputs import random_inputs
from effc.inspect import inspect_model
from effc.numerics import compare_outputs
from effc.pipeline import as_model

GOLDEN_FORMAT = "effc-golden"
GOLDEN_VERSION = 1
MAX_VALUES = 65_536


class GoldenMismatch(AssertionError):
    """The model no longer matches its golden file; the message lists every difference."""


def structure_digest(model) -> str:
    h = hashlib.sha256()
    if model.kind == "onnx":
        graph = model.model.graph
        index = {}
        for i, v in enumerate(graph.inputs):
            index[id(v)] = f"in{i}"
        for v in graph.initializers.values():
            index[id(v)] = "const"
        for n_i, node in enumerate(graph):
            refs = [index.get(id(v), "?") if v is not None else "-" for v in node.inputs]
            attrs = sorted(
                (k, str(a.value))
                for k, a in node.attributes.items()
                if a.type.name not in ("TENSOR", "GRAPH")
            )
            h.update(f"{node.domain}::{node.op_type}({','.join(refs)}){attrs}\n".encode())
            for o_i, out in enumerate(node.outputs):
                index[id(out)] = f"n{n_i}.{o_i}"
    else:
        index = {}
        for n_i, node in enumerate(model.graph_module.graph.nodes):
            index[node.name] = f"n{n_i}"
            args = [index.get(getattr(a, "name", None), repr(a)) for a in node.args]
            target = node.target if node.op != "get_attr" else "attr"
            h.update(f"{node.op}:{target}({','.join(map(str, args))})\n".encode())
    return "sha256:" + h.hexdigest()


def _encode(arr: np.ndarray) -> dict:
    flat = arr.reshape(-1)
    stride = max(1, -(-flat.size // MAX_VALUES))
    return {
        "shape": list(arr.shape),
        "dtype": arr.dtype.name,
        "stride": stride,
        "values": flat[::stride].tolist(),
    }


def _decode(entry: dict) -> np.ndarray:
    return np.asarray(entry["values"], dtype=entry["dtype"])


def make_golden(model, rtol: float, atol: float, shapes=None, seed: int = 0) -> dict:
    info = inspect_model(model)
    inputs = random_inputs(model.input_specs(), seed, shapes, model.vocab_hint())
    outputs = model.run(inputs)
    return {
        "format": GOLDEN_FORMAT,
        "version": GOLDEN_VERSION,
        "source": info["source"],
        "op_counts": info["ops"],
        "structure_digest": structure_digest(model),
        "sparsity": {w["name"]: w["sparsity"] for w in info["weights"]},
        "rtol": rtol,
        "atol": atol,
        "inputs": {
            k: {"shape": list(v.shape), "dtype": v.dtype.name, "values": v.reshape(-1).tolist()}
            for k, v in inputs.items()
        },
        "outputs": [_encode(np.asarray(o)) for o in outputs],
    }


def compare_golden(model, golden: dict) -> list[str]:
    """Every difference between ``model`` and ``golden``, as readable lines (empty: matches)."""
    if golden.get("format") != GOLDEN_FORMAT or golden.get("version") != GOLDEN_VERSION:
        return [f"not an effc golden file of version {GOLDEN_VERSION}"]
    problems = []
    ops = model.op_histogram()
    for op in sorted(set(ops) | set(golden["op_counts"])):
        if ops.get(op, 0) != golden["op_counts"].get(op, 0):
            problems.append(
                f"op {op}: {ops.get(op, 0)} nodes, golden {golden['op_counts'].get(op, 0)}"
            )
    if structure_digest(model) != golden["structure_digest"]:
        problems.append("graph structure changed (structure digest differs)")
    info = inspect_model(model)
    sparsity = {w["name"]: w["sparsity"] for w in info["weights"]}
    for name, expected in golden["sparsity"].items():
        got = sparsity.get(name)
        if got is None:
            problems.append(f"weight {name}: missing")
        elif abs(got - expected) > 1e-9:
            problems.append(f"weight {name}: sparsity {got:.4f}, golden {expected:.4f}")
    names = sorted(s.name for s in model.input_specs())
    if names != sorted(golden["inputs"]):
        return [
            *problems,
            f"inputs {names} differ from the golden file's {sorted(golden['inputs'])}",
        ]
    inputs = {
        k: np.asarray(v["values"], dtype=v["dtype"]).reshape(v["shape"])
        for k, v in golden["inputs"].items()
    }
    outputs = model.run(inputs)
    if len(outputs) != len(golden["outputs"]):
        return [*problems, f"{len(outputs)} outputs, golden {len(golden['outputs'])}"]
    for i, (out, entry) in enumerate(zip(outputs, golden["outputs"])):
        out = np.asarray(out)
        if list(out.shape) != entry["shape"]:
            problems.append(f"output {i}: shape {list(out.shape)}, golden {entry['shape']}")
            continue
        got = out.reshape(-1)[:: entry["stride"]]
        cmp = compare_outputs([_decode(entry)], [got], golden["rtol"], golden["atol"])
        if not cmp["ok"]:
            problems.append(
                f"output {i}: max abs error {cmp['max_abs']:.3e} exceeds rtol {golden['rtol']}, atol {golden['atol']}"
            )
    return problems


def assert_golden(
    model,
    path: str | Path,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    update: bool | None = None,
    shapes=None,
) -> None:
    """Raise GoldenMismatch unless ``model`` (a path or any effc model) matches ``path``.

    With ``update`` (default: whether EFFC_UPDATE_GOLDEN=1) the golden file is (re)written
    instead. A missing golden file is an error, never created silently."""
    model = as_model(model, shapes)
    path = Path(path)
    if update is None:
        update = os.environ.get("EFFC_UPDATE_GOLDEN") == "1"
    if update:
        write_golden(model, path, rtol, atol, shapes)
        return
    if not path.is_file():
        raise GoldenMismatch(
            f"golden file {path} does not exist; write it with EFFC_UPDATE_GOLDEN=1 pytest, or "
            f"effc check MODEL --golden {path} --update"
        )
    problems = compare_golden(model, json.loads(path.read_text()))
    if problems:
        raise GoldenMismatch(f"{model.source} does not match {path}:\n  " + "\n  ".join(problems))


def write_golden(model, path: Path, rtol: float, atol: float, shapes=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(make_golden(model, rtol, atol, shapes), indent=1) + "\n")
    os.replace(tmp, path)
