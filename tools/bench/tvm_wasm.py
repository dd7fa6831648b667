"""Mobile CNNs as WebAssembly (wasm32 + SIMD128, under wasmtime, one thread): TVM's dense
build, effc's block kernel on the dense weights, and effc's sparse builds at 30/50/70% kernel
sparsity, side by side in one process. Whole models, run by effc's ahead-of-time executor
(``backends/tvm_aot.py``) linked with TVM's kernels.

    python -m tools.bench.tvm_wasm [--models mobilenet-v2,mobilenet-v1] [--levels 0.3,0.5,0.7] \\
        [--trials 5] [--repeat 5] [--ort-web DIR] [--litert-js DIR] \\
        [--out tools/bench/results/tvm_wasm]

Variants:
- ``tvm dense (default schedule)``: TVM 0.27's default build of every operator, no tuning (a
  meta-schedule database for wasm32 would need tuning runs inside the WebAssembly runtime).
- ``effc kernel, dense weights``: every 1x1 conv through effc's block kernel with all blocks
  kept, every depthwise and 3x3 conv through effc's direct conv kernel, the other operators as
  above: the same code as the sparse rows, so the ratio to it is what sparsity alone buys.
- ``effc sparse N%``: kernel-sparsity (1x1 convs as 8x1 blocks); each candidate layer (sparse
  1x1 conv, direct depthwise/3x3 conv) runs effc's kernel where it measured faster than TVM's
  operator under wasmtime at build time.
- ``onnxruntime-web dense`` (with ``--ort-web DIR``, a folder where
  ``npm install --prefix DIR onnxruntime-web@1.22.0`` ran): the engine a web user would pick,
  WebAssembly with SIMD on one thread, under node (``tools/bench/node/ort_web.js``), on the
  dense graph; interleaved with the rest.
- ``effc ... (node)`` (with ``--node-wasi``): the same effc artifacts under node's WASI
  (``tools/bench/node/wasi_run.mjs``, V8 with its optimizing compiler up front) instead of
  wasmtime (Cranelift): the web engines below run in V8, so these rows compare like with like.
- ``litert.js dense`` and ``litert.js sparse N%`` (with ``--litert-js DIR``, a folder where
  ``npm install --prefix DIR @litertjs/core@2.5.3`` ran): LiteRT with XNNPACK compiled to
  WebAssembly, one thread, under node (``tools/bench/node/litert_web.mjs``), on the same graphs
  written as TFLite (``tools/bench/litert.py``); the sparse rows store the 1x1 weights sparse,
  and in WebAssembly XNNPACK takes its sparse NCHW path where at least 2/3 of them are zeros.

Each figure is the median over ``trials`` rounds (the variants interleaved) of the executor's
own median over ``repeat`` runs. The floor is the bytes the graph moves (as in tvm_cnn) over the
native read bandwidth measured in the same run; WebAssembly runs one thread, so it is a floor
only. ``max diff`` is the largest absolute difference from onnxruntime on the same input.
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
from pathlib import Path

import numpy as np
import onnx_ir as ir

from effc.backends import tvm as tvm_backend
from effc.backends import tvm_aot
from effc.ir.ort import open_session, session_options
from tools.bench.litert import onnx_to_tflite
from tools.bench.tvm_cnn import PATTERN, build, moved_bytes, read_bandwidth
from tools.results import save

NODE_SCRIPT = Path(__file__).with_name("node") / "ort_web.js"
LITERT_SCRIPT = Path(__file__).with_name("node") / "litert_web.mjs"
WASI_SCRIPT = Path(__file__).with_name("node") / "wasi_run.mjs"


def node_wasi_run(folder: Path, meta: dict, x: np.ndarray, repeat: int):
    """(outputs, median ms) of effc's wasm32 artifact in ``folder`` under node's WASI (V8, the
    web engines' runtime) instead of wasmtime: the same executor, the same files."""
    via = ["node", "--no-liftoff", "--no-warnings", str(WASI_SCRIPT)]
    wasm = tvm_backend.LIB_FILE["wasm32"]
    outs, timing = tvm_aot.execute(Path(folder), meta, [x], wasm, repeat, via=via)
    return {"y": outs[0]}, timing["median_ms"]


def litert_js_run(folder: Path, tflite: Path, x: np.ndarray, runs: int):
    """(output, median ms) of a .tflite model in LiteRT.js under node (modules from
    ``folder``), on NCHW ``x`` fed as NHWC."""
    import subprocess

    io = tflite.with_suffix(".in.f32"), tflite.with_suffix(".out.f32")
    np.ascontiguousarray(x.transpose(0, 2, 3, 1), np.float32).tofile(io[0])
    shape = ",".join(str(d) for d in (x.shape[0], *x.shape[2:], x.shape[1]))
    cmd = ["node", str(LITERT_SCRIPT), str(Path(folder).resolve()), str(tflite), str(io[0])]
    cmd += [shape, str(runs), str(io[1])]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return np.fromfile(io[1], np.float32), float(
        json.loads(done.stdout.strip().splitlines()[-1])["median_ms"]
    )


def ort_web_ms(folder: Path, model: Path, shape, runs: int) -> float:
    """Median ms of ``model`` in onnxruntime-web under node (modules from ``folder``)."""
    import os
    import subprocess

    env = {**os.environ, "NODE_PATH": str(Path(folder).resolve() / "node_modules")}
    cmd = ["node", str(NODE_SCRIPT), str(model), ",".join(map(str, shape)), str(runs)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return float(json.loads(done.stdout.strip().splitlines()[-1])["median_ms"])


def run(
    models: list[str],
    levels: list[float],
    trials: int,
    repeat: int,
    ort_web: str | None = None,
    litert_js: str | None = None,
    node_wasi: bool = False,
) -> dict:
    bw = read_bandwidth()
    rows = []
    with tempfile.TemporaryDirectory(prefix="effc-bench-wasm-") as tmp:
        for name in models:
            ref = f"builtin:{name}"
            variants = {
                "tvm dense (default schedule)": ("cleanup", {"sparse": False}, 0.0),
                "effc kernel, dense weights": ("cleanup", {"kernel_everywhere": True}, 0.0),
            }
            for sp in levels:
                text = f"kernel-sparsity{{sparsity={sp},{PATTERN}}}"
                variants[f"effc sparse {sp:.0%}"] = (text, {}, sp)
            folders, seconds = {}, {}
            for label, (text, options, _) in variants.items():
                folder = Path(tmp) / f"{name}-{len(folders)}"
                seconds[label] = build(ref, text, folder, tvm_target="wasm32", **options)
                folders[label] = folder
                print(f"built {name} {label} in {seconds[label]:.0f} s", flush=True)
            x = {"pixels": np.random.default_rng(0).standard_normal((1, 3, 224, 224), np.float32)}
            runs = {}  # label -> () -> (outputs or None, ms)
            for label, folder in list(folders.items()):
                meta = json.loads((folder / "tvm.json").read_text())

                def wasm(folder=folder, meta=meta, x=x):
                    outs, timing = tvm_backend.run_wasm(folder, meta, x, repeat)
                    return outs, timing["median_ms"]

                runs[label] = wasm
                if node_wasi and label.startswith("effc"):
                    node_label = f"{label} (node)"
                    folders[node_label] = folder
                    variants[node_label], seconds[node_label] = variants[label], seconds[label]
                    runs[node_label] = lambda f=folder, m=meta, x=x: node_wasi_run(
                        f, m, x["pixels"], repeat
                    )
            if ort_web:
                label = "onnxruntime-web dense"
                folders[label] = folders["tvm dense (default schedule)"]
                variants[label], seconds[label] = ("", {}, 0.0), 0.0
                graph, shape = folders[label] / "model.onnx", x["pixels"].shape
                runs[label] = lambda g=graph, s=shape: (
                    None,
                    ort_web_ms(Path(ort_web), g, s, repeat),
                )
            if litert_js:
                # (label, graph, kernel sparsity): the dense graph, then each pruned one
                graphs = [("litert.js dense", folders["tvm dense (default schedule)"], 0.0)]
                graphs += [
                    (label.replace("effc", "litert.js"), folders[label], variants[label][2])
                    for label in list(folders)
                    if label.startswith("effc sparse") and not label.endswith("(node)")
                ]
                for label, folder, level in graphs:
                    tflite = Path(tmp) / f"{name}-{label.replace(' ', '_')}.tflite"
                    graph = ir.load(str(folder / "model.onnx"))
                    tflite.write_bytes(onnx_to_tflite(graph, sparse=level > 0))
                    folders[label] = folder
                    variants[label] = ("", {}, level)
                    seconds[label] = 0.0

                    def web(f=tflite, x=x):
                        y, ms_run = litert_js_run(Path(litert_js), f, x["pixels"], repeat)
                        return {"y": y.reshape(1, -1)}, ms_run

                    runs[label] = web
            times = {label: [] for label in runs}
            diffs = {}
            for _ in range(trials):
                for label, call in runs.items():
                    outs, ms_run = call()
                    times[label].append(ms_run)
                    if label in diffs:
                        continue
                    if outs is None:  # onnxruntime-web runs its own input: not compared
                        diffs[label] = None
                        continue
                    ort = open_session(str(folders[label] / "model.onnx"), session_options(1, True))
                    want = ort.run(None, x)[0]
                    diffs[label] = float(np.abs(next(iter(outs.values())) - want).max())
            ms = {label: float(np.median(v)) for label, v in times.items()}
            base = ms["tvm dense (default schedule)"]
            kernel = ms["effc kernel, dense weights"]
            for label, folder in folders.items():
                meta = json.loads((folder / "tvm.json").read_text())
                chosen = [c for c in meta["sparse_layers"] if c["choice"] == "sparse"]
                convs = meta.get("conv_layers", [])
                direct = [c for c in convs if c["choice"] == "kernel"]
                web = label.startswith(("onnxruntime-web", "litert.js"))
                rows.append(
                    {
                        "model": name,
                        "variant": label,
                        "sparsity": variants[label][2],
                        "ms": ms[label],
                        "vs_tvm_dense": base / ms[label],
                        "vs_kernel_dense": kernel / ms[label],
                        "floor_ms": moved_bytes(folder) / bw * 1e3,
                        "sparse_layers": ""
                        if web
                        else f"{len(chosen)}/{len(meta['sparse_layers'])}",
                        "conv_kernels": "" if web else f"{len(direct)}/{len(convs)}",
                        "max_diff": diffs[label],
                        "build_s": round(seconds[label], 1),
                    }
                )
                print(rows[-1], flush=True)
    return {"runtime": runtime_version(), "bandwidth_gbs": bw / 1e9, "rows": rows}


def runtime_version() -> str:
    from importlib.metadata import version

    return f"wasmtime {version('wasmtime')} (PyPI), wasm32-wasi + SIMD128, one thread"


def markdown(data: dict, command: str) -> str:
    lines = [
        f"Mobile CNNs as WebAssembly, batch 1, 224x224, {data['runtime']} (native read "
        f"bandwidth {data['bandwidth_gbs']:.1f} GB/s in the same run).",
        "",
        f"`{command}`",
        "",
        "| model | variant | ms | floor ms | vs TVM dense | vs effc kernel dense | "
        "sparse layers | conv kernels | max diff | build s |",
        "|---|---|---:|---:|---:|---:|---|---|---:|---:|",
    ]
    for r in data["rows"]:
        diff = "-" if r["max_diff"] is None else f"{r['max_diff']:.1e}"
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['ms']:.1f} | {r['floor_ms']:.2f} | "
            f"{r['vs_tvm_dense']:.2f}x | {r['vs_kernel_dense']:.2f}x | {r['sparse_layers']} | "
            f"{r.get('conv_kernels', '')} | {diff} | {r['build_s']} |"
        )
    return "\n".join(lines)


def plot(data: dict, path: Path) -> None:
    """ms against sparsity per model: effc's sparse builds as a curve, the dense variants as
    horizontal lines (log scale)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'effc[bench]'): no plot")
        return
    names = list(dict.fromkeys(r["model"] for r in data["rows"]))
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4))
    for ax, name in zip(np.atleast_1d(axes), names):
        rows = [r for r in data["rows"] if r["model"] == name]
        curves = {
            "effc sparse (wasmtime)": lambda v: v.startswith("effc sparse") and "node" not in v,
            "effc sparse (node)": lambda v: v.startswith("effc sparse") and "node" in v,
            "litert.js sparse": lambda v: v.startswith("litert.js sparse"),
        }
        for curve, member in curves.items():
            sparse = [r for r in rows if member(r["variant"])]
            if sparse:
                ax.plot(
                    [r["sparsity"] for r in sparse], [r["ms"] for r in sparse], "o-", label=curve
                )
        colors = itertools.cycle(["tab:red", "tab:green", "tab:purple", "tab:orange", "tab:brown"])
        for r in rows:
            if not any(member(r["variant"]) for member in curves.values()):
                ax.axhline(r["ms"], linestyle="--", color=next(colors), label=r["variant"])
        ax.set_title(f"{name}, wasm32, one thread (wasmtime; node for the web engines)")
        ax.set_xlabel("kernel sparsity of the 1x1 convs")
        ax.set_ylabel("ms (batch 1, one thread)")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mobilenet-v2,mobilenet-v1")
    ap.add_argument("--levels", default="0.3,0.5,0.7")
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--ort-web", help="folder with node_modules/onnxruntime-web")
    ap.add_argument("--litert-js", help="folder with node_modules/@litertjs/core")
    ap.add_argument(
        "--node-wasi",
        action="store_true",
        help="also run effc's builds under node's WASI (V8, the web engines' runtime)",
    )
    ap.add_argument("--out", default="tools/bench/results/tvm_wasm")
    args = ap.parse_args()
    levels = [float(v) for v in args.levels.split(",")]
    data = run(
        args.models.split(","),
        levels,
        args.trials,
        args.repeat,
        args.ort_web,
        args.litert_js,
        args.node_wasi,
    )
    command = (
        f"python -m tools.bench.tvm_wasm --models {args.models} --levels {args.levels} "
        f"--trials {args.trials} --repeat {args.repeat}"
        + (f" --ort-web {args.ort_web}" if args.ort_web else "")
        + (f" --litert-js {args.litert_js}" if args.litert_js else "")
        + (" --node-wasi" if args.node_wasi else "")
    )
    save(args.out, data, markdown(data, command))
    plot(data, Path(args.out + ".png"))


if __name__ == "__main__":
    main()
