"""Side-by-side linear-layer benchmark: effc's BSR kernels against what a user would pick today.

    python -m tools.bench.bsr_linear [--quick] [--out tools/bench/results/bsr_linear]

One process, one run, the same thread count (default 2) for torch, onnxruntime and OpenMP. Every
method rotates through enough weight copies to exceed 4x the L3 (read from sysfs; 32 MiB where it
cannot be read), so each call streams its weights from memory. Each row prints the time, the weight
bytes a call reads, and the floor (bytes / bandwidth, with bandwidth measured in the same run by a
read-only reduction over the larger of 512 MiB and 4x the L3, with the same threads). Ratios, not
absolute times, are what compare across machines.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import time
from pathlib import Path

THREADS = int(os.environ.get("EFFC_THREADS", "2"))
os.environ["OMP_NUM_THREADS"] = str(THREADS)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from effc.runtime.timing import l3_bytes  # noqa: E402
from tools.results import save  # noqa: E402

L3_BYTES = l3_bytes()
ROTATE_BYTES = 4 * L3_BYTES


def probe_bytes(rotate: int = ROTATE_BYTES) -> int:
    """Size of the bandwidth probe: at least 512 MiB, and no less than the weight rotation."""
    return max(512 * 2**20, rotate)


def bandwidth(kernels, nbytes: int | None = None) -> float:
    """Bytes per second of a read-only reduction over ``nbytes`` (default ``probe_bytes()``),
    best of 5."""
    buf = torch.randint(0, 255, (nbytes or probe_bytes(),), dtype=torch.uint8)
    kernels.read_bytes(buf)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        kernels.read_bytes(buf)
        best = min(best, time.perf_counter() - t0)
    return buf.numel() / best


def copies_for(nbytes: int, rotate: int = ROTATE_BYTES) -> int:
    return max(2, -(-rotate // max(nbytes, 1)))


def time_rotating(fns: list, seconds: float = 0.6, min_reps: int = 8) -> float:
    """Median seconds per call, calling fns[i % len(fns)]."""
    for f in fns[:2]:
        f()
    samples = []
    t_end = time.perf_counter() + seconds
    i = 0
    while i < min_reps or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fns[i % len(fns)]()
        samples.append(time.perf_counter() - t0)
        i += 1
    return float(np.median(samples))


def make_bsr(out: int, inp: int, sparsity: float, bits: int, group: int, seed: int):
    from effc.runtime.format import from_quantized

    g = torch.Generator().manual_seed(seed)
    ng = inp // group
    codes = torch.randint(0, 2**bits, (out, ng, group), dtype=torch.uint8, generator=g)
    keep = round((1 - sparsity) * ng)
    order = torch.rand(out, ng, generator=g).argsort(dim=1)
    mask = torch.zeros(out, ng, dtype=torch.bool).scatter_(1, order[:, :keep], True)
    scales = torch.rand(out, ng, generator=g) * 0.01
    zeros = torch.randint(0, 2**bits, (out, ng), dtype=torch.uint8, generator=g)
    return from_quantized(codes, scales, zeros, mask, bits)


def copies(make, nbytes: int, rotate: int) -> list:
    """Distinct weight copies totalling at least ``rotate`` bytes (default: 4x the L3)."""
    return [make(i) for i in range(copies_for(nbytes, rotate))]


def inputs(M: int, inp: int, out: int) -> dict:
    x = torch.randn(M, inp)
    return {"x": x, "xb": x.to(torch.bfloat16), "xn": x.numpy(), "zeros": torch.zeros(out, M)}


def methods(out: int, inp: int, seed: int, rotate: int = ROTATE_BYTES):
    """(name, weight bytes per call, weight copies, call(weight, inputs)) for every method; the
    copies are built once per shape and reused for every M."""
    from torch.ao.quantization import quantize_dynamic

    from effc.runtime.cpu import kernels

    k = kernels()
    F = torch.nn.functional
    n = out * inp
    yield (
        "torch fp32 F.linear",
        n * 4,
        copies(lambda i: torch.randn(out, inp), n * 4, rotate),
        lambda w, X: F.linear(X["x"], w),
    )
    yield (
        "torch bf16 F.linear",
        n * 2,
        copies(lambda i: torch.randn(out, inp, dtype=torch.bfloat16), n * 2, rotate),
        lambda w, X: F.linear(X["xb"], w),
    )
    yield (
        "numpy fp32 (OpenBLAS)",
        n * 4,
        copies(
            lambda i: np.random.default_rng(i).standard_normal((inp, out), dtype=np.float32),
            n * 4,
            rotate,
        ),
        lambda w, X: X["xn"] @ w,
    )

    def qdyn(i):
        linear = torch.nn.Sequential(torch.nn.Linear(inp, out, bias=False))
        return quantize_dynamic(linear, {torch.nn.Linear}, dtype=torch.qint8)

    yield "torch quantize_dynamic int8", n, copies(qdyn, n, rotate), lambda q, X: q(X["x"])
    group = 32

    def int4pack(i):
        w = torch.randint(0, 16, (out, inp), dtype=torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(w, 8)
        return packed, torch.rand(inp // group, out, 2).to(torch.bfloat16)

    int4_bytes = n // 2 + (inp // group) * out * 4
    yield (
        "torch int4 _weight_int4pack_mm (g32, bf16 x)",
        int4_bytes,
        copies(int4pack, int4_bytes, rotate),
        lambda p, X: torch.ops.aten._weight_int4pack_mm_for_cpu(X["xb"], p[0], group, p[1]),
    )
    nbits_bytes = n // 2 + (inp // group) * out * (4 + 1)
    yield (
        "onnxruntime MatMulNBits (4-bit g32, acc level 4)",
        nbits_bytes,
        copies(lambda i: matmul_nbits_session(out, inp, group, i), nbits_bytes, rotate),
        lambda s, X: s.run(None, {"x": X["xn"]}),
    )

    def torch_bsr(i):
        blocks = (
            (torch.rand(out // 16, inp // 16) > 0.5)
            .repeat_interleave(16, 0)
            .repeat_interleave(16, 1)
        )
        return (torch.randn(out, inp) * blocks).to_sparse_bsr((16, 16))

    bsr16_bytes = int(n * 0.5 * 4 + (out // 16) * (inp // 16) * 0.5 * 8)
    yield (
        "torch to_sparse_bsr 16x16 S50 fp32 + addmm",
        bsr16_bytes,
        copies(torch_bsr, bsr16_bytes, rotate),
        lambda w, X: torch.addmm(X["zeros"], w, X["x"].T),
    )

    def fp32_x(m, X):
        return k.bsr_linear(
            X["x"], m.indptr, m.indices, m.values, m.scales, m.zeros, out, m.group, m.bits
        )

    for label, sparsity, bits in (
        ("effc BSR W4S50 g16", 0.5, 4),
        ("effc BSR W4 dense g16", 0.0, 4),
        ("effc BSR W8S50 g16", 0.5, 8),
    ):
        nbytes = sum(make_bsr(out, inp, sparsity, bits, 16, seed).nbytes().values())
        yield (
            label,
            nbytes,
            copies(
                functools.partial(
                    lambda i, s, b: make_bsr(out, inp, s, b, 16, seed + i), s=sparsity, b=bits
                ),
                nbytes,
                rotate,
            ),
            fp32_x,
        )
    from effc.runtime.modules import bsr_matmul

    def int8_x(m, X):  # the opt-in int8-activation mode (VNNI where the CPU has it, else AVX2)
        arrays = (m.indptr, m.indices, m.values, m.scales, m.zeros)
        return bsr_matmul(X["x"], arrays, out, m.group, m.bits, True)

    def avx2_only(kernel):  # on AVX-512 CPUs: the same call on the AVX2 kernels
        def call(m, X):
            k.use_avx512(False)
            try:
                return kernel(m, X)
            finally:
                k.use_avx512(True)

        return call

    variants = [("int8 x", int8_x)]
    if k.has_avx512():  # the AVX2 kernels (every x86-64 CPU with AVX2) on the same weights
        variants = [("AVX2 kernels only", avx2_only(fp32_x)), *variants]
        variants.append(("int8 x, AVX2 kernels only", avx2_only(int8_x)))
    nbytes = sum(make_bsr(out, inp, 0.5, 4, 16, seed).nbytes().values())
    for label, call in variants:
        yield (
            f"effc BSR W4S50 g16, {label}",
            nbytes,
            copies(lambda i: make_bsr(out, inp, 0.5, 4, 16, seed + i), nbytes, rotate),
            call,
        )


def matmul_nbits_session(out: int, inp: int, group: int, seed: int):
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    w = np.random.default_rng(seed).standard_normal((inp, out)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", inp])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", out])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    config = DefaultWeightOnlyQuantConfig(block_size=group, is_symmetric=False, accuracy_level=4)
    quant = MatMulNBitsQuantizer(model, algo_config=config)
    quant.process()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(
        quant.model.model.SerializeToString()
        if hasattr(quant.model, "model")
        else onnx._serialize(quant.model),
        opts,
        providers=["CPUExecutionProvider"],
    )


def cpu_description(kernels) -> str:
    """The CPU's model name (Linux) and which of effc's kernel sets it runs."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    isa = "AVX2" + (", AVX-512" if kernels.has_avx512() else "")
    isa += ", AVX512-VNNI" if kernels.has_vnni() else ""
    return f"{name} ({os.cpu_count()} CPUs; effc kernels: {isa})"


def run(shapes, batches, seed: int = 0, rotate: int = ROTATE_BYTES) -> dict:
    from effc.runtime.cpu import kernels

    torch.set_num_threads(THREADS)
    probe = probe_bytes(rotate)
    bw = bandwidth(kernels(), probe)
    rows = []
    for out, inp in shapes:
        for name, nbytes, weights, call in methods(out, inp, seed, rotate):
            for M in batches:
                X = inputs(M, inp, out)
                seconds = time_rotating([functools.partial(call, w, X) for w in weights])
                floor = nbytes / bw * 1e3
                rows.append(
                    {
                        "shape": f"{out}x{inp}",
                        "M": M,
                        "method": name,
                        "ms": seconds * 1e3,
                        "weight_bytes": nbytes,
                        "floor_ms": floor,
                    }
                )
                print(
                    f"{out}x{inp} M={M:<3} {name:<50} {seconds * 1e3:8.3f} ms  floor {floor:7.3f} ms",
                    flush=True,
                )
            del weights
    return {
        "threads": THREADS,
        "bandwidth_GBps": bw / 1e9,
        "l3_MiB": L3_BYTES / 2**20,
        "rotate_MiB": rotate / 2**20,
        "probe_MiB": probe / 2**20,
        "machine": cpu_description(kernels()),
        "torch": torch.__version__,
        "rows": rows,
    }


def to_markdown(result: dict, command: str) -> str:
    lines = [
        "# BSR linear benchmark",
        "",
        f"Command: `{command}`  ",
        f"Threads: {result['threads']} (torch, onnxruntime intra-op, OpenMP); measured read bandwidth "
        f"{result['bandwidth_GBps']:.1f} GB/s (read-only reduction over "
        f"{result['probe_MiB']:.0f} MiB, same threads); torch {result['torch']}.  ",
        f"CPU: {result['machine']}.",
        f"Weights rotate through copies totalling >= {result['rotate_MiB']:.0f} MiB "
        f"(the L3 is {result['l3_MiB']:.0f} MiB). floor = weight bytes / bandwidth.",
        "Activations: fp32 except torch bf16 / int4 (bf16 x), MatMulNBits accuracy level 4 (int8 x), "
        "quantize_dynamic (int8 x) and effc's opt-in `int8 x` rows (x quantized to int8 per "
        "block of 16; AVX512-VNNI dot products where the CPU has them, else AVX2 ones).",
        "",
    ]
    by_case: dict = {}
    for r in result["rows"]:
        by_case.setdefault((r["shape"], r["M"]), []).append(r)
    for (shape, M), rows in by_case.items():
        base = next(r for r in rows if r["method"] == "torch fp32 F.linear")
        nbits = next(r for r in rows if r["method"].startswith("onnxruntime MatMulNBits"))
        lines += [
            f"## {shape}, M = {M}",
            "",
            "| method | ms | weight MB | floor ms | x floor | speedup vs torch fp32 | vs MatMulNBits |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            lines.append(
                f"| {r['method']} | {r['ms']:.3f} | {r['weight_bytes'] / 1e6:.1f} | {r['floor_ms']:.3f} | "
                f"{r['ms'] / r['floor_ms']:.2f} | {base['ms'] / r['ms']:.2f}x | {nbits['ms'] / r['ms']:.2f}x |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one shape (4096x4096), M=1 and 8")
    parser.add_argument("--out", default="tools/bench/results/bsr_linear")
    args = parser.parse_args()
    shapes = [(4096, 4096)] if args.quick else [(4096, 4096), (11008, 4096), (4096, 11008)]
    batches = [1, 8] if args.quick else [1, 8, 64]
    result = run(shapes, batches)
    command = "python -m tools.bench.bsr_linear" + (" --quick" if args.quick else "")
    save(args.out, result, to_markdown(result, command))


if __name__ == "__main__":
    main()
