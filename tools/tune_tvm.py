"""Tune a model's dense operators with TVM's meta-schedule and write the tuning database that
``effc compile ... --target tvm --tuning DIR`` applies. Never run in CI (tuning takes minutes to
hours); databases are committed under ``tools/bench/results/tvm_tuning/``.

The model is taken through the same passes as the tvm target (``fixpoint(cleanup,fuse)``,
``tvm-legalize``), imported with TVM's ONNX frontend and tuned for this machine's x86 target with
a fixed trial budget (xgboost cost model, evolutionary search):

    python -m tools.tune_tvm builtin:mobilenet-v2 --trials 1500 \\
        --out tools/bench/results/tvm_tuning/mobilenet-v2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from effc.backends import tvm as tvm_backend
from effc.context import PassContext
from effc.ir.torch_io import load_model
from effc.pipeline import Pipeline, ensure_onnx


def legalized_onnx(ref: str, passes: str = ""):
    """The ONNX graph the tvm target would build for ``ref`` after ``passes``."""
    texts = [passes] if passes else []
    pipeline = Pipeline.from_text(",".join([*texts, *tvm_backend.legalization()]))
    result = pipeline.run(load_model(ref), PassContext())
    return ensure_onnx(result.model, result.report, "tuning").model


def tune(ref: str, out: Path, trials: int, passes: str = "") -> dict:
    import tvm
    from tvm.s_tir import meta_schedule as ms

    model = legalized_onnx(ref, passes)
    mod = tvm_backend.fused(tvm_backend.import_onnx(model), tvm_backend.target_for("x86"))
    target = tvm_backend.target_for("x86")
    work = Path(tempfile.mkdtemp(prefix="effc-tune-"))
    t0 = time.time()
    with target, tvm.transform.PassContext(opt_level=3):
        ms.relax_integration.tune_relax(
            mod,
            params={},
            target=target,
            work_dir=str(work),
            max_trials_global=trials,
            num_trials_per_iter=8,
            builder=ms.builder.LocalBuilder(timeout_sec=300),
            runner=ms.runner.LocalRunner(timeout_sec=60),
            seed=0,
        )
    seconds = time.time() - t0
    out.mkdir(parents=True, exist_ok=True)
    for name in ("database_workload.json", "database_tuning_record.json"):
        shutil.copy(work / name, out / name)
    meta = {
        "model": ref,
        "passes": passes,
        "trials": trials,
        "seconds": round(seconds),
        "target": str(target),
        "threads": os.cpu_count(),
        "command": f"python -m tools.tune_tvm {ref} --trials {trials} --out {out}"
        + (f' --passes "{passes}"' if passes else ""),
    }
    (out / "tuning.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    return meta


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--trials", type=int, default=1500)
    ap.add_argument("--passes", default="")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    print(json.dumps(tune(args.model, Path(args.out), args.trials, args.passes), indent=1))


if __name__ == "__main__":
    main()
