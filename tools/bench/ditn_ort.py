"""onnxruntime CPU speed of the DITN-style SR model: the unmodified export against the same
model after effc's exact passes (LayerNorm forms and fusion rules; outputs within fp32 rounding).

    python -m tools.bench.ditn_ort [--size 128] [--rounds 16] [--out tools/bench/results/ditn_ort]

One process, 2 intra-op threads for every session. Each export (published unfold once, naive
per-layer and Swin-style per-op unfolds; dynamo and legacy exporters) is timed with
onnxruntime's graph optimizations on (the default, ORT_ENABLE_ALL) and off (ORT_DISABLE_ALL),
so the table shows what effc adds beyond what onnxruntime already does. Sessions alternate
(5 calls each) for ``--rounds`` rounds; each figure is the fastest call (interference on a
shared machine only adds time). The floor beside each figure is the bytes the graph's tensors
occupy (every intermediate written once and read once, weights read once) divided by the read
bandwidth measured in the same run: a memory-traffic floor for an unfused execution.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

THREADS = int(os.environ.get("EFFC_THREADS", "2"))
os.environ["OMP_NUM_THREADS"] = str(THREADS)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from tools.results import save  # noqa: E402

EXACT = "fixpoint(cleanup,fuse),layernorm,fixpoint(cleanup,fuse)"


def traffic_bytes(model) -> int:
    """Bytes of every tensor of the graph, shapes from ONNX shape inference: intermediates and
    outputs written once and read once, inputs and weights read once."""
    import onnx
    import onnx_ir as ir

    proto = onnx.shape_inference.infer_shapes(ir.serde.serialize_model(model))
    g = proto.graph

    def nbytes(info) -> int:
        t = info.type.tensor_type
        dims = [d.dim_value for d in t.shape.dim]
        if not dims and not t.HasField("shape") or any(d <= 0 for d in dims):
            return 0
        return int(np.prod(dims)) * onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).itemsize

    written = sum(nbytes(v) for v in list(g.value_info) + list(g.output))
    weights = sum(onnx.numpy_helper.to_array(t).nbytes for t in g.initializer)
    return 2 * written + sum(nbytes(v) for v in g.input) + weights


def session(model, optimize: bool):
    from effc.ir.ort import session_for

    return session_for(model, THREADS, optimize)


def build(weights: str | None, size: int):
    """{name: (original OnnxModel, effc OnnxModel, report)} for each export of the model."""
    import effc
    from effc.ir import OnnxModel
    from effc.ir.torch_io import export_onnx
    from effc.models.ditn import DITN, DITNConfig, load_trained

    models = {}
    variants = [
        ("DITN (published unfold once)", "once"),
        ("DITN (unfold per layer)", "per-layer"),
        ("DITN (unfold per op, Swin-style)", "per-op"),
    ]
    for label, unfold in variants:
        model = (
            load_trained(unfold=unfold) if weights != "random" else DITN(DITNConfig(unfold=unfold))
        )
        model.eval()
        x = {"x": torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))}
        for kind, legacy in (("dynamo, opset 20", False), ("legacy, opset 14", True)):
            original = OnnxModel(export_onnx(model, x, legacy=legacy))
            optimized = OnnxModel(export_onnx(model, x, legacy=legacy))
            result = effc.Pipeline.from_text(EXACT).run(optimized)
            models[f"{label}, {kind}"] = (original, result.model, result.report, x)
    return models


def fired(report) -> dict[str, int]:
    """Counts summed over the pipeline's records: pass.stat -> total (rule firings, folds)."""
    totals: dict[str, int] = {}
    for r in report.records:
        for key, value in r.stats.items():
            if isinstance(value, int) and not isinstance(value, bool) and value:
                name = f"{r.name}.{key}"
                totals[name] = totals.get(name, 0) + value
    return totals


def time_sessions(sessions: dict, feeds: dict, rounds: int, calls: int = 5) -> dict:
    samples = {k: [] for k in sessions}
    for s in sessions.values():  # warm up: first calls (allocations, caches, clocks) are slower
        t_end = time.perf_counter() + 0.5
        while time.perf_counter() < t_end:
            s.run(None, feeds)

    for _ in range(rounds):
        for key, s in sessions.items():
            for _ in range(calls):
                t0 = time.perf_counter()
                s.run(None, feeds)
                samples[key].append(time.perf_counter() - t0)
    # the minimum: on a shared machine interference only ever adds time
    return {k: min(v) * 1e3 for k, v in samples.items()}


def main() -> None:
    from effc.runtime.cpu import kernels
    from tools.bench.bsr_linear import bandwidth

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128, help="LR input height and width")
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--weights", default="trained", choices=["trained", "random"])
    parser.add_argument("--out", default="tools/bench/results/ditn_ort")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    bw = bandwidth(kernels())
    rows = []
    for name, (original, optimized, report, x) in build(args.weights, args.size).items():
        feeds = {"x": x["x"].numpy()}
        sessions = {
            (side, opt): session((original if side == "export" else optimized).model, opt)
            for side in ("export", "effc")
            for opt in (True, False)
        }
        ref = sessions[("export", False)].run(None, feeds)[0]
        err = float(np.abs(sessions[("effc", False)].run(None, feeds)[0] - ref).max())
        ms = time_sessions(sessions, feeds, args.rounds)
        for opt in (True, False):
            floors = {
                side: traffic_bytes((original if side == "export" else optimized).model) / bw * 1e3
                for side in ("export", "effc")
            }
            rows.append(
                {
                    "model": name,
                    "ort_optimizations": "on" if opt else "off",
                    "export_ms": ms[("export", opt)],
                    "effc_ms": ms[("effc", opt)],
                    "speedup": ms[("export", opt)] / ms[("effc", opt)],
                    "export_nodes": len(list(original.model.graph)),
                    "effc_nodes": len(list(optimized.model.graph)),
                    "export_floor_ms": floors["export"],
                    "effc_floor_ms": floors["effc"],
                    "max_abs_error": err,
                    "fired": fired(report),
                }
            )
            print(
                f"{name:<48} ORT opt {'on ' if opt else 'off'}  export {ms[('export', opt)]:8.2f} ms"
                f"  effc {ms[('effc', opt)]:8.2f} ms  x{rows[-1]['speedup']:.2f}",
                flush=True,
            )
    meta = {
        "command": f"python -m tools.bench.ditn_ort --size {args.size} --rounds {args.rounds}"
        + (" --weights random" if args.weights == "random" else ""),
        "input": f"1 x 3 x {args.size} x {args.size} (x2 -> {2 * args.size})",
        "pipeline": EXACT,
        "threads": THREADS,
        "bandwidth_GBps": bw / 1e9,
        "cpu": platform.processor() or platform.machine(),
        "onnxruntime": __import__("onnxruntime").__version__,
    }
    save(args.out, {"meta": meta, "rows": rows}, to_markdown(meta, rows))


def to_markdown(meta: dict, rows: list[dict]) -> str:
    lines = [
        "# DITN-style SR on onnxruntime CPU: unmodified export vs effc exact passes",
        "",
        f"Command: `{meta['command']}`  ",
        f"Input {meta['input']}; effc pipeline `{meta['pipeline']}`; {meta['threads']} intra-op "
        f"threads; onnxruntime {meta['onnxruntime']}; read bandwidth {meta['bandwidth_GBps']:.1f} "
        "GB/s (same run). floor = tensor bytes of the graph (intermediates written and read once) "
        "/ bandwidth.",
        "",
        "| model / export | ORT graph opts | export ms | floor | effc ms | floor | speedup | nodes | max abs err | fuse rules fired |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    for r in rows:
        fired_text = ", ".join(
            f"{k.split('.', 1)[1]} {v}"
            for k, v in r.get("fired", {}).items()
            if k.startswith("fuse.")
        )
        r = {**r, "fired_text": fired_text or "-"}
        lines.append(
            f"| {r['model']} | {r['ort_optimizations']} | {r['export_ms']:.2f} | "
            f"{r['export_floor_ms']:.2f} | {r['effc_ms']:.2f} | {r['effc_floor_ms']:.2f} | "
            f"{r['speedup']:.2f}x | {r['export_nodes']} -> {r['effc_nodes']} | {r['max_abs_error']:.1e} | "
            f"{r['fired_text']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
