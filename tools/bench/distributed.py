"""Calibration statistics and BQPO on torch.distributed: 2 processes with 1 thread each against 1
process with 2 threads, on the real SmolLM2-135M: every linear layer's Hessian X^T X over the
same calibration windows, and gqsa-train's BQPO (after W4 quantization) with each step's batch of
windows split over the processes and the gradients all-reduced, in seconds per block.

    python -m tools.bench.distributed [--windows 8] [--seqlen 256] [--rounds 3]
        [--bqpo-windows 4] [--bqpo-seqlen 128] [--bqpo-steps 5]
        [--out tools/bench/results/distributed]

Each figure is the median of ``--rounds`` rounds (BQPO: one round). Both modes must give the
same Hessians (the table shows the largest relative difference: the fp64 sums run in another
order) and the same BQPO codes up to float order (the table counts the codes that differ).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import AutoTokenizer

from effc.context import PassContext
from effc.ir import FxModel
from effc.ir.reducers import hessians
from effc.ir.sites import weight_sites
from effc.models.real import smollm2_folder
from effc.pipeline import Pipeline
from tools.quality.data import split
from tools.quality.data import windows as make_windows
from tools.quality.perplexity import load_model
from tools.results import save


def _setup(windows: int, seqlen: int):
    folder = smollm2_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    calib = make_windows(tokenizer, split()[0], windows, seqlen)
    model = FxModel(load_model(folder), {"input_ids": calib[:1, :32]})
    inputs = [{"input_ids": w[None].numpy()} for w in calib]
    return model, weight_sites(model), inputs


def _timed(model, sites, inputs) -> tuple[float, dict]:
    t0 = time.perf_counter()
    h = hessians(model, sites, inputs)
    return time.perf_counter() - t0, h


def _bqpo(windows: int, seqlen: int, steps: int) -> tuple[float, dict]:
    """Seconds per block of BQPO on W4-quantized SmolLM2 (each step: all ``windows``), and the
    trained codes."""
    model, _, inputs = _setup(windows, seqlen)
    ctx = PassContext(calibration=inputs)
    model = Pipeline.from_text("quantize{bits=4,group=16}").run(model, ctx).model
    (bqpo,) = Pipeline.from_text(
        f"gqsa-train{{steps={steps},samples={windows},batch={windows}}}"
    ).leaves()
    t0 = time.perf_counter()
    result = bqpo.run(model, ctx)
    seconds = time.perf_counter() - t0
    codes = {k: s.codes for k, s in result.model.compression.quantized().items()}
    return seconds / result.stats["blocks"], codes


def _worker(rank, port, windows, seqlen, rounds, out, bqpo_args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank))
    os.environ["WORLD_SIZE"] = "2"
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    model, sites, inputs = _setup(windows, seqlen)
    times = []
    for _ in range(rounds):
        dist.barrier()
        seconds, h = _timed(model, sites, inputs)
        times.append(seconds)
    dist.barrier()
    per_block, codes = _bqpo(*bqpo_args)
    if rank == 0:
        torch.save({"times": times, "h": h, "bqpo": per_block, "codes": codes}, out)
    dist.destroy_process_group()


def run(windows: int, seqlen: int, rounds: int, bqpo_args: tuple[int, int, int]) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = f"/tmp/effc-dist-bench-{os.getpid()}.pt"
    mp.spawn(_worker, args=(port, windows, seqlen, rounds, out, bqpo_args), nprocs=2, join=True)
    two = torch.load(out, weights_only=True)
    os.unlink(out)
    torch.set_num_threads(2)
    model, sites, inputs = _setup(windows, seqlen)
    one_times, h1 = [], None
    for _ in range(rounds):
        seconds, h1 = _timed(model, sites, inputs)
        one_times.append(seconds)
    bqpo_one, codes = _bqpo(*bqpo_args)
    flips = sum(int((codes[k] != two["codes"][k]).sum()) for k in codes)
    diff = max(
        float((h1[k].double() - two["h"][k].double()).abs().max() / h1[k].abs().max()) for k in h1
    )
    one, dist2 = statistics.median(one_times), statistics.median(two["times"])
    return {
        "model": "SmolLM2-135M",
        "windows": windows,
        "seqlen": seqlen,
        "rounds": rounds,
        "sites": len(sites),
        "rows": [
            {"mode": "1 process x 2 threads", "seconds": round(one, 2), "speedup": 1.0},
            {
                "mode": "2 processes x 1 thread (gloo)",
                "seconds": round(dist2, 2),
                "speedup": round(one / dist2, 2),
            },
        ],
        "max_relative_difference": diff,
        "bqpo": {
            "windows": bqpo_args[0],
            "seqlen": bqpo_args[1],
            "steps": bqpo_args[2],
            "codes": sum(v.numel() for v in codes.values()),
            "codes_differing": flips,
            "rows": [
                {"mode": "1 process x 2 threads", "seconds_per_block": round(bqpo_one, 3)},
                {
                    "mode": "2 processes x 1 thread (gloo)",
                    "seconds_per_block": round(two["bqpo"], 3),
                },
            ],
        },
        "note": "1 process ran after the 2-process rounds (not interleaved: spawn is per run)",
    }


def markdown(data: dict, command: str) -> str:
    lines = [
        f"Calibration statistics (the Hessian of each of {data['sites']} linear layers) of "
        f"{data['model']} over {data['windows']} windows of {data['seqlen']} tokens; median of "
        f"{data['rounds']} rounds. Largest relative difference between the two modes' Hessians: "
        f"{data['max_relative_difference']:.1e}.",
        "",
        f"`{command}`",
        "",
        "| mode | seconds | speedup |",
        "|---|---:|---:|",
    ]
    for r in data["rows"]:
        lines.append(f"| {r['mode']} | {r['seconds']} | {r['speedup']}x |")
    b = data.get("bqpo")
    if b:
        one = b["rows"][0]["seconds_per_block"]
        lines += [
            "",
            f"BQPO (gqsa-train after W4 RTN), {b['steps']} steps per block, each step all "
            f"{b['windows']} windows of {b['seqlen']} tokens (2 processes: 2 windows each, the "
            f"gradients summed with one all_reduce per step). Codes that differ between the "
            f"modes (float order): {b['codes_differing']} of {b['codes']:,}.",
            "",
            "| mode | seconds per block | speedup |",
            "|---|---:|---:|",
        ]
        for r in b["rows"]:
            s = r["seconds_per_block"]
            lines.append(f"| {r['mode']} | {s} | {one / s:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--bqpo-windows", type=int, default=4)
    ap.add_argument("--bqpo-seqlen", type=int, default=128)
    ap.add_argument("--bqpo-steps", type=int, default=5)
    ap.add_argument("--out", default="tools/bench/results/distributed")
    args = ap.parse_args()
    bqpo_args = (args.bqpo_windows, args.bqpo_seqlen, args.bqpo_steps)
    data = run(args.windows, args.seqlen, args.rounds, bqpo_args)
    command = (
        f"python -m tools.bench.distributed --windows {args.windows} --seqlen {args.seqlen} "
        f"--rounds {args.rounds} --bqpo-windows {args.bqpo_windows} --bqpo-seqlen "
        f"{args.bqpo_seqlen} --bqpo-steps {args.bqpo_steps}"
    )
    save(args.out, data, markdown(data, command))


if __name__ == "__main__":
    main()
