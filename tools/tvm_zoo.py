"""Which third-party ONNX files TVM 0.27 takes: each file of the zoo (tools/zoo.py) imported by
TVM's relax ONNX frontend as it is, then compiled by effc's tvm target (its cleanup, fuse and
tvm-legalize, TVM's default x86 build) and run by TVM's VM against onnxruntime on the original
file, same inputs (dynamic dims fixed by effc's default rule, as onnxruntime is fed). Then effc's
own kernels on the file: ``cleanup,kernel-sparsity{sparsity=0.3}`` built with every plain 1x1
conv in effc's sparse block kernel and every depthwise and KxK conv in its direct conv kernel
(``kernel_everywhere``: no layer left to TVM's operators where a kernel applies), against
onnxruntime running the same compressed graph.

    python -m tools.tvm_zoo [--quick] [--out tools/bench/results/tvm_zoo]
    python -m tools.tvm_zoo --wasm [--trials 3 --repeat 3] [--ort-web DIR] [--out ...]
    python -m tools.tvm_zoo --aarch64 [--out tools/bench/results/tvm_zoo_aarch64]

``--wasm``: every file as WebAssembly (wasm32 + SIMD128, one thread, under wasmtime, effc's
ahead-of-time executor): TVM's default build of the dense file against effc's kernels on the same
file at 30% kernel sparsity (``kernel_everywhere``), each checked against onnxruntime on its own
graph and timed in interleaved rounds (the median round of the executor's median of ``repeat``
runs). ``--ort-web DIR`` (DIR holds node_modules/onnxruntime-web, ``npm install --prefix DIR
onnxruntime-web@1.22.0``) times the original file in onnxruntime-web under node in the same
rounds: the engine a web user would pick.

``--aarch64``: every file built for aarch64 (NEON) in the same two variants and run for real under
``qemu-aarch64`` by effc's host program, each checked against onnxruntime (x86) on its own graph;
no timings (under emulation they mean nothing).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from effc.backends import tvm as tvm_backend
from effc.backends.onnxruntime import run_file
from effc.compile import compile_model
from effc.context import PassContext
from effc.errors import EffcError
from effc.inputs import random_inputs
from effc.ir.torch_io import load_model
from effc.numerics import compare_outputs
from tools.bench.tvm_wasm import ort_web_ms, runtime_version
from tools.results import save
from tools.zoo import QUICK, ZOO


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[-1][:160] if text else ''}"


def run_entry(entry, work: Path) -> dict:
    path = entry.file()
    row = {"file": entry.name, "what": entry.what}
    if path is None:
        return {**row, "raw": "not installed", "effc": "not installed"}
    loaded = load_model(str(path))
    specs = loaded.input_specs()
    inputs = entry.inputs(specs) if entry.inputs else random_inputs(specs, 0)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            tvm_backend.import_onnx(loaded.model)
        row["raw"] = "imports"
    except EffcError as e:
        row["raw"] = str(e).removeprefix("TVM's ONNX importer refused the graph: ")[:160]
    except Exception as e:  # the importer fails in many ways
        row["raw"] = _first_line(e)
    # a file's own inputs verify too (random ones may take a branch no real input takes:
    # Silero's If on its sample rate)
    calib = [inputs] if entry.inputs else []
    out = work / entry.name
    t0 = time.perf_counter()
    try:
        err = _build_and_compare(path, "cleanup", out, inputs, calib, {"sparse": False}, path)
        row.update(
            effc="runs",
            max_abs=err.get("max_abs"),
            max_rel=err.get("max_rel"),
            seconds=round(time.perf_counter() - t0, 1),
        )
    except Exception as e:
        row["effc"] = _first_line(e)
    # effc's sparse 1x1 and direct conv kernels on every layer they take, against onnxruntime
    # on the same compressed graph (the artifact's reference model.onnx)
    out = work / f"{entry.name}-kernels"
    try:
        options = {"kernel_everywhere": True}
        err = _build_and_compare(
            path, KERNEL_PASSES, out, inputs, calib, options, out / "model.onnx"
        )
        meta = json.loads((out / tvm_backend.META_FILE).read_text())
        row.update(
            kernels="runs",
            **_kernel_counts(meta),
            kernels_max_abs=err.get("max_abs"),
            kernels_max_rel=err.get("max_rel"),
        )
    except Exception as e:
        row["kernels"] = _first_line(e)
    return row


KERNEL_PASSES = "cleanup,kernel-sparsity{sparsity=0.3}"


def _kernel_counts(meta: dict) -> dict:
    """How many layers of a tvm build run effc's sparse 1x1 kernel and its direct conv kernel."""
    return {
        "sparse_1x1": sum(c["choice"] == "sparse" for c in meta["sparse_layers"]),
        "conv_kernel": sum(c["choice"] == "kernel" for c in meta.get("conv_layers", [])),
    }


def _build_and_compare(
    source, passes, out, inputs, calib, options, reference, verify: bool = True
) -> dict:
    """Build ``source`` with ``passes`` for the tvm target into ``out``, run it (a wasm32 build
    under wasmtime), and return its error against onnxruntime running ``reference`` on the same
    inputs."""
    shapes = {k: list(v.shape) for k, v in inputs.items()}
    with contextlib.redirect_stderr(io.StringIO()):
        ctx = PassContext(shapes=shapes, calibration=calib)
        compile_model(
            str(source), passes, out, "tvm", ctx, force=True, verify=verify, backend_options=options
        )
    got = list(tvm_backend.run(out, inputs).values())
    want = list(run_file(reference, inputs).values())
    return compare_outputs([np.asarray(w) for w in want], [np.asarray(g) for g in got])


def to_markdown(rows: list[dict], command: str) -> str:
    lines = [
        "# TVM 0.27 on the zoo's third-party ONNX files",
        "",
        f"Command: `{command}`. *raw*: TVM's relax ONNX frontend on the file as it is. *effc*: "
        "`effc compile FILE --passes cleanup --target tvm` (cleanup, fuse, tvm-legalize, TVM's "
        "default x86 build), run by TVM's VM; error against onnxruntime on the original file, "
        'same inputs. *effc kernels*: `--passes "' + KERNEL_PASSES + "\"` built with effc's "
        "sparse 1x1 kernel and direct conv kernel on every layer they take "
        "(`kernel_everywhere`), against onnxruntime on the same compressed graph.",
        "",
        "| file | what | raw import | effc --target tvm | max abs error | build s | "
        "effc kernels | 1x1 / conv layers | max abs error |",
        "|---|---|---|---|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        err = f"{r['max_abs']:.1e}" if r.get("max_abs") is not None else "-"
        kerr = f"{r['kernels_max_abs']:.1e}" if r.get("kernels_max_abs") is not None else "-"
        layers = f"{r['sparse_1x1']} / {r['conv_kernel']}" if "sparse_1x1" in r else "-"
        lines.append(
            f"| {r['file']} | {r['what']} | {r['raw']} | {r['effc']} | {err} | "
            f"{r.get('seconds', '-')} | {r.get('kernels', '-')} | {layers} | {kerr} |"
        )
    ok_raw = sum(r["raw"] == "imports" for r in rows)
    ok = sum(r["effc"] == "runs" for r in rows)
    ok_k = sum(r.get("kernels") == "runs" for r in rows)
    lines += [
        "",
        f"Raw import: {ok_raw} of {len(rows)}; through effc: {ok} of {len(rows)} run; with "
        f"effc's kernels: {ok_k} of {len(rows)} run.",
    ]
    return "\n".join(lines)


CROSS_VARIANTS = {
    "tvm dense (default schedule)": ("cleanup", {"sparse": False}),
    "effc kernels, 30% kernel sparsity": (KERNEL_PASSES, {"kernel_everywhere": True}),
}


ORT_WEB = "onnxruntime-web"


def cross_entry(
    entry, work: Path, target: str, trials: int = 0, repeat: int = 1, ort_web: str = ""
) -> dict:
    """One zoo file built for ``target`` (wasm32 under wasmtime, aarch64 under qemu): each
    variant's build and error against onnxruntime on its own graph, and for wasm32 its median
    time over ``trials`` interleaved rounds, with onnxruntime-web on the original file in the
    same rounds where ``ort_web`` names its node_modules folder."""
    path = entry.file()
    row = {"file": entry.name, "what": entry.what}
    if path is None:
        return {**row, "status": "not installed"}
    specs = load_model(str(path)).input_specs()
    inputs = entry.inputs(specs) if entry.inputs else random_inputs(specs, 0)
    calib = [inputs] if entry.inputs else []
    runs = {}
    for label, (passes, options) in CROSS_VARIANTS.items():
        out = work / f"{entry.name}-{target}-{len(runs)}"
        t0 = time.perf_counter()
        try:
            cross = {"tvm_target": target, **options}
            reference = out / "model.onnx"
            err = _build_and_compare(path, passes, out, inputs, calib, cross, reference, False)
            meta = json.loads((out / tvm_backend.META_FILE).read_text())
        except Exception as e:
            row[label] = {"status": _first_line(e)}
            continue
        row[label] = {
            "status": "runs",
            "build_s": round(time.perf_counter() - t0, 1),
            "max_abs": err.get("max_abs"),
            **_kernel_counts(meta),
            "times": [],
        }
        runs[label] = (out, meta)
    timed = list(runs)
    if ort_web and target == "wasm32" and runs:
        row[ORT_WEB] = _ort_web_fits(inputs)
        timed += [ORT_WEB] if row[ORT_WEB]["status"] == "runs" else []
    for _ in range(trials if target == "wasm32" else 0):  # interleaved rounds
        for label in timed:
            if label == ORT_WEB:
                shape = next(iter(inputs.values())).shape
                row[label]["times"].append(ort_web_ms(Path(ort_web), path, shape, repeat))
                continue
            out, meta = runs[label]
            row[label]["times"].append(
                tvm_backend.run_wasm(out, meta, inputs, repeat)[1]["median_ms"]
            )
    for label in timed:
        if row[label]["times"]:
            row[label]["ms"] = float(np.median(row[label]["times"]))
    return row


def _ort_web_fits(inputs: dict) -> dict:
    """Whether tools/bench/node/ort_web.js can feed the file (one float32 input)."""
    if len(inputs) != 1 or next(iter(inputs.values())).dtype != np.float32:
        return {"status": "the node harness feeds one float32 input only"}
    return {"status": "runs", "times": []}


def _cell(v: dict, key: str, fmt: str) -> str:
    """A variant's figure, or (in its time column) why it did not run."""
    if v.get("status") != "runs":
        return (v.get("status") or "-")[:90] if key == "ms" else "-"
    return fmt.format(v[key]) if v.get(key) is not None else "-"


CROSS_TITLES = {
    "wasm32": "as WebAssembly",
    "aarch64": "built for aarch64 and run under qemu",
}


def cross_markdown(rows: list[dict], command: str, target: str, runtime: str) -> str:
    """The table of ``cross_entry`` rows: errors for both targets, times for wasm32 only."""
    dense, kernels = CROSS_VARIANTS
    timed = target == "wasm32"
    web = timed and any(ORT_WEB in r for r in rows)
    lines = [
        f"# The zoo's third-party ONNX files {CROSS_TITLES[target]}",
        "",
        f"Command: `{command}`. {runtime}. *TVM dense*: `--passes cleanup`, TVM 0.27's default "
        f'schedule for every operator. *effc kernels*: `--passes "{KERNEL_PASSES}"` with every '
        "1x1 conv in effc's sparse block kernel and every depthwise/KxK conv in its direct conv "
        "kernel. Error: against onnxruntime (x86) on the same graph, same inputs."
        + (
            " *onnxruntime-web*: the original file in onnxruntime-web (WebAssembly, SIMD, one "
            "thread) under node, timed in the same interleaved rounds."
            if web
            else ""
        ),
        "",
    ]
    if timed:
        lines += [
            "| file | what | TVM dense ms | max abs error | effc kernels ms | 1x1 / conv layers "
            "| max abs error | speedup |"
            + (" onnxruntime-web ms | effc vs ort-web |" if web else ""),
            "|---|---|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if web else ""),
        ]
    else:
        lines += [
            "| file | what | TVM dense | max abs error | effc kernels | 1x1 / conv layers | "
            "max abs error |",
            "|---|---|---|---:|---|---:|---:|",
        ]
    for r in rows:
        d, k = (
            r.get(dense, {"status": r.get("status")}),
            r.get(kernels, {"status": r.get("status")}),
        )
        layers = f"{k['sparse_1x1']} / {k['conv_kernel']}" if "sparse_1x1" in k else "-"
        if timed:
            status_d, status_k = _cell(d, "ms", "{:.1f}"), _cell(k, "ms", "{:.1f}")
        else:
            status_d, status_k = ((v.get("status") or "-")[:90] for v in (d, k))
        cells = [r["file"], r["what"], status_d, _cell(d, "max_abs", "{:.1e}"), status_k]
        cells += [layers, _cell(k, "max_abs", "{:.1e}")]
        if timed:
            cells.append(f"{d['ms'] / k['ms']:.2f}x" if "ms" in d and "ms" in k else "-")
        if web:
            w = r.get(ORT_WEB, {"status": "-"})
            cells.append(_cell(w, "ms", "{:.1f}"))
            cells.append(f"{w['ms'] / k['ms']:.2f}x" if "ms" in w and "ms" in k else "-")
        lines.append("| " + " | ".join(cells) + " |")
    ok = sum(r.get(kernels, {}).get("status") == "runs" for r in rows)
    lines += ["", f"effc's kernels run {CROSS_TITLES[target]} on {ok} of {len(rows)} files."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--wasm", action="store_true", help="as WebAssembly under wasmtime, timed")
    ap.add_argument("--aarch64", action="store_true", help="for aarch64, run under qemu")
    ap.add_argument("--ort-web", default="", help="node_modules folder of onnxruntime-web")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    target = "wasm32" if args.wasm else "aarch64" if args.aarch64 else None
    entries = [e for e in ZOO if not args.quick or e.name in QUICK]
    rows = []
    with tempfile.TemporaryDirectory(prefix="effc-tvm-zoo-") as tmp:
        for entry in entries:
            if target:
                rows.append(
                    cross_entry(entry, Path(tmp), target, args.trials, args.repeat, args.ort_web)
                )
            else:
                rows.append(run_entry(entry, Path(tmp)))
            print(rows[-1], flush=True)
    command = "python -m tools.tvm_zoo" + (" --quick" if args.quick else "")
    if target == "wasm32":
        command += f" --wasm --trials {args.trials} --repeat {args.repeat}"
        command += f" --ort-web {args.ort_web}" if args.ort_web else ""
        runtime = runtime_version() + "; effc's ahead-of-time executor linked with TVM's kernels"
    elif target == "aarch64":
        command += " --aarch64"
        runtime = f"{_qemu_version()}, effc's host program over TVM's aarch64 runtime (NEON)"
    else:
        save(args.out or "tools/bench/results/tvm_zoo", {"rows": rows}, to_markdown(rows, command))
        return
    out = args.out or f"tools/bench/results/tvm_zoo_{target.removesuffix('32')}"
    save(out, {"rows": rows}, cross_markdown(rows, command, target, runtime))


def _qemu_version() -> str:
    try:
        done = subprocess.run(["qemu-aarch64", "--version"], capture_output=True, text=True)
    except OSError:
        return "qemu-aarch64 (not installed)"
    return done.stdout.splitlines()[0] if done.stdout else "qemu-aarch64"


if __name__ == "__main__":
    main()
