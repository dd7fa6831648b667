"""``effc run OUT --compare MODEL``: the artifact beside the model it came from, on the same
inputs and threads: the reference under onnxruntime with all its optimizations, the artifact
under its own runtime (onnxruntime, with effc's BSR op for the bsr target; TVM's relax VM for the
tvm target): file size, latency (interleaved medians) and output error. What a user wants to see
after a compile."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from effc.backends import bsr, tvm
from effc.ir.onnx_io import save_onnx
from effc.ir.ort import open_session, session_options
from effc.numerics import compare_outputs
from effc.pipeline import lower_to_onnx
from effc.runtime.timing import interleaved_medians


def model_files(path: Path) -> int:
    """Bytes of an ONNX file and its external data."""
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*") if p.is_file())


def compare_artifact(
    folder: Path, backend: str, reference, inputs: dict, threads: int, trials: int = 20
) -> list[dict]:
    """Rows for the reference model and the artifact: bytes, ms, speedup, output error."""
    with tempfile.TemporaryDirectory(prefix="effc-compare-") as tmp:
        ref_path = Path(tmp) / "reference.onnx"
        lowered = reference if reference.kind == "onnx" else lower_to_onnx(reference)
        save_onnx(lowered.model, ref_path)
        ref = open_session(str(ref_path), session_options(threads, True))
        if backend == tvm.NAME:
            vm, meta = tvm.load(folder, threads)
            art_bytes = tvm.artifact_bytes(folder, meta)

            def art_run():
                return list(tvm.call(vm, meta, inputs).values())
        else:
            art_path = folder / "model.onnx"
            art_bytes = model_files(art_path)
            domains = [bsr.DOMAIN] if backend == bsr.NAME else []
            art = open_session(str(art_path), session_options(threads, True), domains)

            def art_run():
                return art.run(None, inputs)

        want = ref.run(None, inputs)
        got = art_run()
        ms = interleaved_medians([lambda: ref.run(None, inputs), art_run], trials, paired=True)
        error = compare_outputs([np.asarray(a) for a in want], [np.asarray(b) for b in got])
        return [
            {"model": "reference", "bytes": model_files(ref_path), "ms": ms[0], "speedup": 1.0},
            {
                "model": f"artifact ({backend})",
                "bytes": art_bytes,
                "ms": ms[1],
                "speedup": ms[0] / ms[1],
                "max_abs": error.get("max_abs"),
                "max_rel": error.get("max_rel"),
            },
        ]
