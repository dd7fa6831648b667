"""Where effc's sparse MobileNetV2 build and LiteRT's XNNPACK differ, layer by layer, in one
process: effc's build at the given kernel sparsity (its per-layer times as the build measured
them: the chosen one of TVM's tuned operator and effc's kernel, each conv alone with its bias
and clamp), XNNPACK on each conv layer alone (a one-conv TFLite model of the same shape, bias and
ReLU6 fused, dense weights: on x86 XNNPACK runs dense kernels), and both whole models alone. The
whole-model time minus the layers' sum is what each engine spends between and around its conv
layers (adds, the mean and classifier, dispatch, memory). effc's executor also profiles each
step of the whole model, so its layers' time in the model (caches holding what the layers
before left, not their own inputs) stands beside their time alone, and the executor's own
time outside its steps is measured.

    python -m tools.bench.litert_layers [--sparsity 0.3] [--out tools/bench/results/litert_layers]
"""

from __future__ import annotations

import argparse
import json
import math
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
from effc.runtime.timing import interleaved_medians  # noqa: E402
from tools.bench.litert import litert_call  # noqa: E402
from tools.bench.tvm_cnn import PATTERN, TUNING, build  # noqa: E402
from tools.results import save  # noqa: E402


def one_conv(o: int, c: int, k: int, stride: int, groups: int, hw: int, seed: int = 0) -> ir.Model:
    """An ONNX model of one padded conv (random weights, zero bias) and a ReLU6."""
    import onnx.helper as h
    import onnx.numpy_helper as nh

    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((o, c // groups, k, k)) * 0.1).astype(np.float32)
    conv = h.make_node(
        "Conv",
        ["x", "w", "b"],
        ["y"],
        group=groups,
        pads=[k // 2] * 4,
        strides=[stride] * 2,
        kernel_shape=[k, k],
        dilations=[1, 1],
    )
    clip = h.make_node("Clip", ["y", "lo", "hi"], ["z"])
    inits = [
        nh.from_array(w, "w"),
        nh.from_array(np.zeros(o, np.float32), "b"),
        nh.from_array(np.array(0, np.float32), "lo"),
        nh.from_array(np.array(6, np.float32), "hi"),
    ]
    graph = h.make_graph(
        [conv, clip],
        "one_conv",
        [h.make_tensor_value_info("x", 1, [1, c, hw, hw])],
        [h.make_tensor_value_info("z", 1, None)],
        initializer=inits,
    )
    return ir.from_proto(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]))


def xnnpack_us(model: ir.Model, runs: int = 200) -> float:
    """Median microseconds of one call of ``model`` in LiteRT (XNNPACK, THREADS threads)."""
    x = np.ones([int(d) for d in model.graph.inputs[0].shape], np.float32)
    return interleaved_medians([litert_call(model, False, x, THREADS)], runs)[0] * 1e3


def layers_of(meta: dict) -> list[dict]:
    """The build's timed conv layers: kind, shape and effc's chosen time."""
    out = []
    for c in meta.get("conv_layers", []):
        if "dense_us" not in c:
            continue
        o, _, k, _ = c["shape"]
        depthwise = c["groups"] > 1
        kind = "depthwise" if depthwise else f"{k}x{k}"
        chosen = c["kernel_us"] if c["choice"] == "kernel" else c["dense_us"]
        hw = int(round(math.sqrt(c["pixels"])))
        cin = o if depthwise else c["shape"][1]
        out.append(
            {
                "kind": kind,
                "layer": f"{kind} {o} s{c['stride']} @{hw}x{hw}",
                "spec": (o, cin, k, c["stride"], c["groups"], hw),
                "effc_us": chosen,
                "choice": c["choice"],
            }
        )
    for c in meta.get("sparse_layers", []):
        if "dense_us" not in c:
            continue
        o, cin = c["shape"][0], c["shape"][1]
        hw = int(round(math.sqrt(c["pixels"])))
        chosen = c["sparse_us"] if c["choice"] == "sparse" else c["dense_us"]
        out.append(
            {
                "kind": "1x1",
                "layer": f"1x1 {cin}->{o} @{hw}x{hw} (kept {c['density']:.2f})",
                "spec": (o, cin, 1, 1, 1, hw),
                "effc_us": chosen,
                "choice": c["choice"],
            }
        )
    return out


def family(kernel: str) -> str:
    """What a step of effc's executor runs, from its kernel's name."""
    for prefix, what in (
        ("effc_bsr_pointwise", "1x1 (effc sparse kernel)"),
        ("effc_conv", "KxK and depthwise (effc direct kernel)"),
        ("fused_conv2d", "conv (TVM's operator)"),
        ("fused_matmul", "classifier (TVM's matmul)"),
    ):
        if kernel.startswith(prefix):
            return what
    return kernel.rstrip("0123456789_")


def row_family(row: dict) -> str:
    """The ``family`` of the kernel a timed layer of the build (``layers_of``) runs as: effc's
    sparse or direct kernel where chosen, else TVM's conv operator (a 1x1 left dense too)."""
    if row["choice"] == "sparse":
        return "1x1 (effc sparse kernel)"
    if row["choice"] == "kernel":
        return "KxK and depthwise (effc direct kernel)"
    return "conv (TVM's operator)"


def step_profile(vm, meta: dict, folder: Path, x: np.ndarray, runs: int) -> dict | None:
    """Mean microseconds per step of effc's executor over ``runs`` runs of the whole model,
    summed by kernel family, and the run's time outside every step (the executor's own: input
    and output copies, dispatch). None for a VM build."""
    from effc.backends.tvm_aot import PLAN_FILE, Native

    if not isinstance(vm, Native):
        return None
    aot = meta["aot"]
    lines = (folder / PLAN_FILE).read_text().splitlines()
    at = next(k for k, line in enumerate(lines) if line.startswith("steps "))
    kernels = [
        aot["kernel_names"][int(line.split()[0])] for line in lines[at + 1 :][: aot["steps"]]
    ]
    ns = np.zeros(aot["steps"], np.int64)
    vm.run([x], ns)  # warm
    ns[:] = 0
    t0 = time.perf_counter()
    for _ in range(runs):
        vm.run([x], ns)
    whole_us = (time.perf_counter() - t0) / runs * 1e6
    families: dict[str, dict] = {}
    for kernel, step_ns in zip(kernels, ns):
        f = families.setdefault(family(kernel), {"steps": 0, "us": 0.0})
        f["steps"] += 1
        f["us"] += float(step_ns) / runs / 1e3
    steps_us = sum(f["us"] for f in families.values())
    return {"whole_us": whole_us, "steps_us": steps_us, "families": families}


def run(sparsity: float, trials: int) -> dict:
    name = "mobilenet-v2"
    tuning = TUNING / name if (TUNING / name / "database_tuning_record.json").is_file() else None
    with tempfile.TemporaryDirectory(prefix="effc-bench-layers-") as tmp:
        folder = Path(tmp) / "sparse"
        text = f"kernel-sparsity{{sparsity={sparsity},{PATTERN}}}"
        build(f"builtin:{name}", text, folder, tuning=str(tuning) if tuning else None)
        meta = json.loads((folder / "tvm.json").read_text())
        rows = layers_of(meta)
        for r in rows:
            r["xnnpack_us"] = xnnpack_us(one_conv(*r["spec"]))
            r["ratio"] = r["effc_us"] / r["xnnpack_us"]
        x = {"pixels": np.random.default_rng(0).standard_normal((1, 3, 224, 224), np.float32)}
        # LiteRT first: after TVM's pool has run, its 2-thread calls often run at one-thread
        # speed on this VM (see tools/bench/tvm_cnn.py)
        lite = litert_call(folder / "model.onnx", False, x["pixels"], THREADS)
        xnn = interleaved_medians([lite], trials)[0]
        vm, vmeta = tvm_backend.load(folder, THREADS)
        effc = interleaved_medians([lambda: tvm_backend.call(vm, vmeta, x)], trials)[0]
        steps = step_profile(vm, vmeta, folder, x["pixels"], 10 * trials)
    kinds = {}
    for r in rows:
        k = kinds.setdefault(r["kind"], {"layers": 0, "effc_us": 0.0, "xnnpack_us": 0.0})
        k["layers"] += 1
        k["effc_us"] += r["effc_us"]
        k["xnnpack_us"] += r["xnnpack_us"]
    for r in rows:
        r.pop("spec")
    return {
        "threads": THREADS,
        "sparsity": sparsity,
        "rows": rows,
        "kinds": kinds,
        "whole_ms": {"effc": effc, "xnnpack": xnn},
        "steps": steps,
    }


def markdown(data: dict, command: str) -> str:
    sp = f"{data['sparsity']:.0%}"
    lines = [
        f"MobileNetV2 at {sp} kernel sparsity, layer by layer: effc's build (the chosen one of "
        f"TVM's tuned operator and effc's kernel, as the build timed it) against LiteRT's XNNPACK "
        f"(dense kernels, one-conv models of the same shapes), {data['threads']} threads, one "
        "process.",
        "",
        f"`{command}`",
        "",
        "| kind | layers | effc us | XNNPACK us | effc / XNNPACK |",
        "|---|---:|---:|---:|---:|",
    ]
    total_e = total_x = 0.0
    for kind, k in data["kinds"].items():
        total_e += k["effc_us"]
        total_x += k["xnnpack_us"]
        lines.append(
            f"| {kind} | {k['layers']} | {k['effc_us']:.0f} | {k['xnnpack_us']:.0f} | "
            f"{k['effc_us'] / k['xnnpack_us']:.2f} |"
        )
    whole = data["whole_ms"]
    lines.append(
        f"| conv layers, sum | | {total_e:.0f} | {total_x:.0f} | {total_e / total_x:.2f} |"
    )
    lines.append(
        f"| whole model | | {whole['effc'] * 1e3:.0f} | {whole['xnnpack'] * 1e3:.0f} | "
        f"{whole['effc'] / whole['xnnpack']:.2f} |"
    )
    lines.append(
        f"| whole model minus the conv layers | | {whole['effc'] * 1e3 - total_e:.0f} | "
        f"{whole['xnnpack'] * 1e3 - total_x:.0f} | |"
    )
    steps = data.get("steps")
    if steps:
        alone: dict[str, float] = {}
        for r in data["rows"]:
            f = row_family(r)
            alone[f] = alone.get(f, 0.0) + r["effc_us"]
        lines += [
            "",
            "effc's build in the whole model (its executor's per-step profile, "
            f"{steps['whole_us']:.0f} us a run with the profile on), against the same layers "
            "alone as the build timed them:",
            "",
            "| steps of | steps | in the model us | alone us | in model / alone |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, f in steps["families"].items():
            a = alone.get(name)
            ratio = f"{f['us'] / a:.2f}" if a else ""
            lines.append(
                f"| {name} | {f['steps']} | {f['us']:.0f} | {f'{a:.0f}' if a else ''} | {ratio} |"
            )
        lines.append(
            f"| the executor outside its steps | | {steps['whole_us'] - steps['steps_us']:.0f} | | |"
        )
    lines += [
        "",
        "| layer | effc us | choice | XNNPACK us | effc / XNNPACK |",
        "|---|---:|---|---:|---:|",
    ]
    for r in data["rows"]:
        lines.append(
            f"| {r['layer']} | {r['effc_us']:.0f} | {r['choice']} | {r['xnnpack_us']:.0f} | "
            f"{r['ratio']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sparsity", type=float, default=0.3)
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--out", default="tools/bench/results/litert_layers")
    args = ap.parse_args()
    data = run(args.sparsity, args.trials)
    command = (
        f"python -m tools.bench.litert_layers --sparsity {args.sparsity} --trials {args.trials}"
    )
    save(args.out, data, markdown(data, command))


if __name__ == "__main__":
    main()
