"""Mobile CNN latency on this CPU: onnxruntime dense, TVM dense (default build, and with a
meta-schedule tuning database where one is committed), MNN dense and MNN with its sparse
convolutions (the engine SparseByteNN compares with; ``mnnconvert --detectSparseSpeedUp`` on the
same pruned graphs), LiteRT's XNNPACK delegate on the same graphs written as TFLite (dense, and
with the 1x1 weights stored sparse: ``tools/bench/litert.py``), effc's TVM build with its own
kernels on the dense weights, and effc's TVM build at 30/50/70% kernel sparsity (1x1 convs as
8x1 blocks, sparse kernels where they measured faster than TVM's dense operator; depthwise and
3x3 convs by effc's direct conv kernel where it measured faster than TVM's tuned operator; the
other layers TVM's, tuned), side by side in one process, same threads. effc's builds run in
effc's executor (``backends/tvm_aot.py``, in process); the first sparsity level is built a
second time for TVM's relax VM, which shows what the executor buys; the TVM dense rows run in
TVM's VM.

    python -m tools.bench.tvm_cnn [--models mobilenet-v2,mobilenet-v1] [--levels 0.3,0.5,0.7] \\
        [--trials 20] [--out tools/bench/results/tvm_cnn]

Each figure is the median of interleaved runs (warm-up first; each timed run follows an untimed
run of the same engine, so no engine is timed while another's worker threads still spin); the
"alone" column times each engine again in blocks of back-to-back runs (trials / 5 a block, the
blocks of all engines interleaved over five rounds, so a slow phase of this shared VM falls on
all of them), in the same process (LiteRT's XNNPACK thread pool puts its worker to sleep after
every call, and interleaved call by call with the other engines on this 2-core VM it often ran
at its one-thread speed); "vs XNNPACK" compares those alone figures with LiteRT's dense row.
onnxruntime's threads do not spin between calls (``session_options(spinning=False)``): a
spinning pool takes the cores from whichever engine runs next. The floor beside it is the bytes
the graph moves (every intermediate written and read once, weights read once; sparse weights
counted at their kept values plus one int32 index per 8-value block) over the read bandwidth
measured in the same run (it counts every intermediate at memory bandwidth, while small ones
stay in the caches, so a build can beat it). Per-layer ratios (TVM / effc time of each
candidate layer, as the build measured them) are in the JSON and the second table. A plot of latency against
sparsity is written next to the table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import tempfile
import time
from pathlib import Path

THREADS = int(os.environ.get("EFFC_THREADS", "2"))
os.environ["OMP_NUM_THREADS"] = str(THREADS)
os.environ["TVM_NUM_THREADS"] = str(THREADS)

import numpy as np  # noqa: E402
import onnx_ir as ir  # noqa: E402

from effc.backends import tvm as tvm_backend  # noqa: E402
from effc.compile import compile_model  # noqa: E402
from effc.context import PassContext  # noqa: E402
from effc.ir.ort import open_session, session_options  # noqa: E402
from effc.ir.torch_io import load_model  # noqa: E402
from effc.runtime.timing import interleaved_medians  # noqa: E402
from tools.bench.ditn_ort import traffic_bytes  # noqa: E402
from tools.bench.litert import litert_call, zero_fraction_1x1  # noqa: E402
from tools.results import save  # noqa: E402

TUNING = Path("tools/bench/results/tvm_tuning")
PATTERN = "patterns=[pointwise:8x1,linear:dense,conv:dense]"


def read_bandwidth(nbytes: int = 256 * 2**20) -> float:
    """Bytes per second of a numpy sum over a buffer larger than the caches, best of 5."""
    buf = np.ones(nbytes // 4, np.float32)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


def moved_bytes(folder: Path) -> int:
    """Dense traffic of the artifact's graph, with the sparse layers' weights at their packed
    size (kept values + one int32 index per block)."""
    model = ir.load(str(folder / "model.onnx"))
    total = traffic_bytes(model)
    meta = json.loads((folder / "tvm.json").read_text())
    for c in meta.get("sparse_layers", []):
        if c["choice"] == "sparse":
            o, ci = c["shape"][0], c["shape"][1]
            dense = o * ci * 4
            kept = c["density"] * o * ci * 4 + c["density"] * o * ci / c["rows"] * 4
            total -= int(dense - kept)
    return total


def build(ref: str, passes: str, out: Path, **backend_options) -> float:
    """Seconds to compile ``ref`` with ``passes`` for the tvm target into ``out``
    (``backend_options`` go to the tvm backend: tuning, sparse, tvm_target, ...)."""
    t0 = time.time()
    compile_model(
        load_model(ref),
        passes,
        out,
        "tvm",
        PassContext(),
        force=True,
        verify=False,
        backend_options=backend_options,
    )
    return time.time() - t0


def mnn_call(onnx_path: Path, mnn_path: Path, sparse: bool, x: np.ndarray):
    """A callable running the graph in MNN (CPU, THREADS, high precision), converted by
    mnnconvert (with ``--detectSparseSpeedUp``: MNN's sparse convolutions where it finds them
    faster); None where MNN is not installed."""
    import subprocess
    import sys

    try:
        import MNN.expr as F
        import MNN.nn as nn
    except ImportError:
        return None
    # the converter itself (MNN's _tools extension), not the mnnconvert script: that wrapper
    # runs "pip install -U aliyun-log-python-sdk" when the SDK is missing (which downgrades
    # protobuf below what onnx needs) and posts a usage log
    convert = "import sys, _tools; _tools.mnnconvert(['mnnconvert', *sys.argv[1:]])"
    cmd = [sys.executable, "-c", convert, "-f", "ONNX", "--modelFile", str(onnx_path)]
    cmd += ["--MNNModel", str(mnn_path), "--bizCode", "effc"]
    if sparse:
        cmd.append("--detectSparseSpeedUp")
    subprocess.run(cmd, check=True, capture_output=True)
    rt = nn.create_runtime_manager(({"backend": "CPU", "numThread": THREADS, "precision": "high"},))
    module = nn.load_module_from_file(str(mnn_path), ["pixels"], [], runtime_manager=rt)

    def call():
        y = module.forward([F.const(x, list(x.shape), F.NCHW)])[0]
        return np.array(F.convert(y, F.NCHW).read())

    return call


def run(models: list[str], levels: list[float], trials: int) -> dict:
    bw = read_bandwidth()
    rows, layers = [], []
    with tempfile.TemporaryDirectory(prefix="effc-bench-tvm-") as tmp:
        for name in models:
            ref = f"builtin:{name}"
            tuning = (
                TUNING / name if (TUNING / name / "database_tuning_record.json").is_file() else None
            )
            dense = {"sparse": False, "executor": "vm"}  # TVM as TVM runs it
            variants = {"tvm dense (default build)": ("cleanup", None, dense, 0.0)}
            if tuning:
                variants["tvm dense (tuned)"] = ("cleanup", tuning, dense, 0.0)
            # effc's kernels on the dense weights: what the direct conv kernel buys by itself
            everywhere = {"kernel_everywhere": True}
            variants["effc tvm kernels, dense weights"] = ("cleanup", tuning, everywhere, 0.0)
            for sp in levels:
                text = f"kernel-sparsity{{sparsity={sp},{PATTERN}}}"
                variants[f"effc tvm sparse {sp:.0%}"] = (text, tuning, {}, sp)
            # what effc's executor buys over TVM's VM: the first level again, in the VM
            text = f"kernel-sparsity{{sparsity={levels[0]},{PATTERN}}}"
            vm_label = f"effc tvm sparse {levels[0]:.0%} (relax VM)"
            variants[vm_label] = (text, tuning, {"executor": "vm"}, levels[0])
            folders, seconds = {}, {}
            for label, (text, db, options, _) in variants.items():
                folder = Path(tmp) / f"{name}-{len(folders)}"
                tuning = str(db) if db else None
                seconds[label] = build(ref, text, folder, tuning=tuning, **options)
                folders[label] = folder
                print(f"built {name} {label} in {seconds[label]:.0f} s", flush=True)
            first = next(iter(folders.values()))
            x = {"pixels": np.random.default_rng(0).standard_normal((1, 3, 224, 224), np.float32)}
            ort = open_session(
                str(first / "model.onnx"), session_options(THREADS, True, spinning=False)
            )
            calls = {"onnxruntime dense": lambda s=ort, x=x: s.run(None, x)}
            levels_of = {label: v[3] for label, v in variants.items()}
            for label, folder in folders.items():
                vm, meta = tvm_backend.load(folder, THREADS)
                calls[label] = lambda vm=vm, meta=meta, x=x: tvm_backend.call(vm, meta, x)
            # the other engines on the same graphs: dense, then each pruned one stored sparse
            others = {}
            for engine in ("mnn", "litert xnnpack"):
                others[f"{engine} dense"] = (first, False)
                for label in [v for v in variants if "sparse" in v and "VM" not in v]:
                    others[label.replace("effc tvm", engine)] = (folders[label], True)
                    levels_of[label.replace("effc tvm", engine)] = variants[label][3]
            for label, (folder, sparse) in others.items():
                if label.startswith("mnn"):
                    call = mnn_call(
                        folder / "model.onnx", folder / "model.mnn", sparse, x["pixels"]
                    )
                else:
                    call = litert_call(folder / "model.onnx", sparse, x["pixels"], THREADS)
                if call is None:
                    continue
                same = open_session(
                    str(folder / "model.onnx"), session_options(THREADS, True, spinning=False)
                )
                want = same.run(None, x)[0]  # the other engines run the same graph
                np.testing.assert_allclose(call().reshape(want.shape), want, atol=1e-3)
                calls[label] = call
                folders[label] = folder
            ms = dict(zip(calls, interleaved_medians(list(calls.values()), trials, paired=True)))
            # each engine again on its own, back to back: LiteRT's XNNPACK pool wakes its worker
            # per call, and interleaved with other engines on this VM it often ran single-threaded;
            # in blocks of runs, the blocks interleaved, so a slow phase of the machine does not
            # fall on one engine's runs only
            block = max(1, trials // 5)
            alone = dict(zip(calls, interleaved_medians(list(calls.values()), trials, True, block)))
            base_tuned = ms.get("tvm dense (tuned)")
            for label, t in ms.items():
                folder = folders.get(label, first)
                meta = json.loads((folder / "tvm.json").read_text())
                chosen = [c for c in meta["sparse_layers"] if c["choice"] == "sparse"]
                convs = meta.get("conv_layers", [])
                kernel = [c for c in convs if c["choice"] == "kernel"]
                rows.append(
                    {
                        "model": name,
                        "variant": label,
                        "sparsity": levels_of.get(label, 0.0),
                        "ms": t,
                        "alone_ms": alone[label],
                        "vs_ort": ms["onnxruntime dense"] / t,
                        "vs_tvm_tuned": base_tuned / t if base_tuned else None,
                        "vs_xnnpack_alone": alone["litert xnnpack dense"] / alone[label]
                        if "litert xnnpack dense" in alone
                        else None,
                        "sparse_layers": f"{len(chosen)}/{len(meta['sparse_layers'])}"
                        if label.startswith("effc")
                        else "",
                        "conv_kernels": f"{len(kernel)}/{len(convs)}"
                        if label.startswith("effc")
                        else "",
                        "floor_ms": moved_bytes(folder) / bw * 1e3,
                        "zeros_1x1": zero_fraction_1x1(ir.load(str(folder / "model.onnx"))),
                        "build_s": round(seconds.get(label, 0.0), 1),
                    }
                )
                if label.startswith("effc") and "VM" not in label:
                    for c in convs:
                        if "dense_us" in c:
                            kind = (
                                "depthwise"
                                if c["groups"] > 1
                                else f"{c['shape'][2]}x{c['shape'][2]}"
                            )
                            layers.append(
                                {
                                    "model": name,
                                    "variant": label,
                                    "layer": f"{kind} {c['shape'][0]} s{c['stride']} "
                                    f"@{c['pixels']}px",
                                    "density": 1.0,
                                    "dense_us": c["dense_us"],
                                    "sparse_us": c["kernel_us"],
                                    "ratio": c["dense_us"] / c["kernel_us"],
                                    "choice": c["choice"],
                                }
                            )
                    for c in meta["sparse_layers"]:
                        if "dense_us" in c:
                            layers.append(
                                {
                                    "model": name,
                                    "variant": label,
                                    "layer": f"{c['shape'][1]}->{c['shape'][0]} @{c['pixels']}px",
                                    "density": c["density"],
                                    "dense_us": c["dense_us"],
                                    "sparse_us": c["sparse_us"],
                                    "ratio": c["dense_us"] / c["sparse_us"],
                                    "choice": c["choice"],
                                }
                            )
    return {"threads": THREADS, "bandwidth_gbs": bw / 1e9, "rows": rows, "layers": layers}


XNNPACK_NOTE = (
    "LiteRT rows: effc's graph written as a .tflite flatbuffer (`tools/bench/litert.py`), run by "
    "LiteRT's default XNNPACK delegate; the sparse rows store every 1x1 convolution's weight "
    "sparse (DENSIFY), the form XNNPACK's sparse inference asks for, which also needs at least "
    "2/3 zeros across the 1x1 convs. XNNPACK takes its sparse (NCHW) path only on ARM and "
    "WebAssembly: on an x86 CPU with AVX it keeps its dense kernels (`xnn_is_chw_compatible_config`"
    ': "on processors with AVX ISA dense inference is expected to be faster than sparse"), so '
    "here those rows measure XNNPACK's dense kernels on the pruned weights."
)


def markdown(data: dict, command: str) -> str:
    lines = [
        f"Mobile CNN latency, batch 1, 224x224, {data['threads']} threads, one process "
        f"(read bandwidth {data['bandwidth_gbs']:.1f} GB/s in the same run).",
        "",
        f"`{command}`",
        "",
        "| model | variant | ms | alone ms | floor ms | vs onnxruntime | vs TVM tuned | "
        "vs XNNPACK (alone) | 1x1 zeros | sparse layers | conv kernels | build s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|---:|",
    ]
    for r in data["rows"]:
        tuned = f"{r['vs_tvm_tuned']:.2f}x" if r["vs_tvm_tuned"] else "-"
        alone = f"{r['alone_ms']:.2f}" if "alone_ms" in r else "-"
        xnn = f"{r['vs_xnnpack_alone']:.2f}x" if r.get("vs_xnnpack_alone") else "-"
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['ms']:.2f} | {alone} | {r['floor_ms']:.3f} | "
            f"{r['vs_ort']:.2f}x | {tuned} | {xnn} | {r.get('zeros_1x1', 0):.0%} | {r['sparse_layers']} | {r.get('conv_kernels', '')} "
            f"| {r['build_s']} |"
        )
    lines += ["", XNNPACK_NOTE]
    if data["layers"]:
        lines += [
            "",
            "Per-layer (each candidate alone with its bias and clamp, as the build measured "
            "it: TVM's operator built with the same tuning database, which covers it where the "
            "layer's form matches the model's, vs effc's kernel: the direct conv kernel for "
            "depthwise and 3x3 convs, the sparse kernel for 1x1 convs):",
            "",
            "| model | variant | layer | kept blocks | dense us | effc us | dense/effc | choice |",
            "|---|---|---|---:|---:|---:|---:|---|",
        ]
        for r in data["layers"]:
            lines.append(
                f"| {r['model']} | {r['variant']} | {r['layer']} | {r['density']:.2f} | "
                f"{r['dense_us']:.0f} | {r['sparse_us']:.0f} | {r['ratio']:.2f} | {r['choice']} |"
            )
    return "\n".join(lines)


def plot(data: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'effc[bench]'): no plot")
        return
    fig, axes = plt.subplots(1, len({r["model"] for r in data["rows"]}), figsize=(11, 4))
    axes = np.atleast_1d(axes)
    for ax, name in zip(axes, dict.fromkeys(r["model"] for r in data["rows"])):
        rows = [r for r in data["rows"] if r["model"] == name]
        for engine in ("effc tvm", "mnn", "litert xnnpack"):
            sparse = [r for r in rows if r["variant"].startswith(f"{engine} sparse")]
            if sparse:
                ax.plot(
                    [r["sparsity"] for r in sparse],
                    [r.get("alone_ms", r["ms"]) for r in sparse],
                    "o-",
                    label=f"{engine} sparse",
                )
        styles = itertools.cycle(
            ["tab:green", "tab:red", "tab:purple", "tab:brown", "tab:gray", "tab:olive", "tab:cyan"]
        )
        for r in rows:
            if "sparse" not in r["variant"]:
                ax.axhline(
                    r.get("alone_ms", r["ms"]),
                    linestyle="--",
                    label=r["variant"],
                    color=next(styles),
                )
        ax.set_title(name)
        ax.set_xlabel("kernel sparsity of the 1x1 convs")
        ax.set_ylabel("ms (batch 1, each engine alone)")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def replot(out: str) -> None:
    """Redraw the plot from a committed JSON (``python -c 'from tools.bench.tvm_cnn import
    replot; replot("tools/bench/results/tvm_cnn")'``)."""
    plot(json.loads(Path(out + ".json").read_text()), Path(out + ".png"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mobilenet-v2,mobilenet-v1")
    ap.add_argument("--levels", default="0.3,0.5,0.7")
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--out", default="tools/bench/results/tvm_cnn")
    args = ap.parse_args()
    data = run(args.models.split(","), [float(v) for v in args.levels.split(",")], args.trials)
    command = (
        f"python -m tools.bench.tvm_cnn --models {args.models} --levels {args.levels} "
        f"--trials {args.trials}"
    )
    save(args.out, data, markdown(data, command))
    plot(data, Path(args.out + ".png"))


if __name__ == "__main__":
    main()
