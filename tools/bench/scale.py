"""Peak memory and wall time of ``effc compile`` against the number of transformer blocks, on
random-weight LLaMA-shaped HF folders written as bf16 safetensors (issue 29's scale table).

    python -m tools.bench.scale [--blocks 2,4,8] [--hidden 4096 --inter 11008 --heads 32]
        [--passes "quantize{bits=4,group=16}"] [--target bsr] [--calib-tokens 8x128]
        [--extra-args "--stream"] [--work /tmp/effc-scale] [--out tools/bench/results/scale]

``--calib-tokens NxT`` writes N random-token windows of T tokens (seed 0, with all-ones attention
masks) to the work folder and passes them as ``--calib``.

Each folder is written one block at a time (one safetensors shard per block and an index, as
HF shards large checkpoints), so writing never holds the model. Each compile runs in a child
process; this process samples the child's /proc status every 20 ms and reports the peak of
RssAnon (anonymous memory: what the process allocated, without the memory-mapped file pages the
kernel can drop) and of VmHWM (resident set including file pages), with the wall time. The
bytes-per-parameter column is peak RssAnon over the model's parameters: flat in the number of
blocks means memory grows with the model; falling means a fixed cost spread over more blocks.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from effc.stream import memory
from tools.results import save

LLAMA_7B = {"hidden": 4096, "inter": 11008, "heads": 32, "vocab": 32000}


def block_tensors(i: int, hidden: int, inter: int, kv: int, g: torch.Generator, dtype) -> dict:
    p = f"model.layers.{i}."

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(dtype)

    return {
        p + "input_layernorm.weight": torch.ones(hidden, dtype=dtype),
        p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=dtype),
        p + "self_attn.q_proj.weight": rand(hidden, hidden),
        p + "self_attn.k_proj.weight": rand(kv, hidden),
        p + "self_attn.v_proj.weight": rand(kv, hidden),
        p + "self_attn.o_proj.weight": rand(hidden, hidden),
        p + "mlp.gate_proj.weight": rand(inter, hidden),
        p + "mlp.up_proj.weight": rand(inter, hidden),
        p + "mlp.down_proj.weight": rand(hidden, inter),
    }


def write_llama(
    folder: Path,
    blocks: int,
    hidden: int,
    inter: int,
    heads: int,
    vocab: int,
    kv_heads: int | None = None,
    seed: int = 0,
    dtype=torch.bfloat16,
) -> int:
    """A random-weight LlamaForCausalLM folder (config.json, one shard per block plus one for
    the embeddings, final norm and lm_head, and model.safetensors.index.json); returns its
    parameter count. Reuses a complete folder written with the same arguments."""
    kv_heads = kv_heads or heads
    kv = hidden // heads * kv_heads
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "num_hidden_layers": blocks,
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "effc_seed": seed,
    }
    index_path = folder / "model.safetensors.index.json"
    params = blocks * (2 * hidden * hidden + 2 * kv * hidden + 3 * inter * hidden + 2 * hidden)
    params += 2 * vocab * hidden + hidden
    if index_path.is_file() and json.loads((folder / "config.json").read_text()) == config:
        return params
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    shards = blocks + 1
    weight_map: dict[str, str] = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        if i < blocks:
            tensors = block_tensors(i, hidden, inter, kv, g, dtype)
        else:
            tensors = {
                "model.embed_tokens.weight": (torch.randn(vocab, hidden, generator=g) * 0.02).to(
                    dtype
                ),
                "model.norm.weight": torch.ones(hidden, dtype=dtype),
                "lm_head.weight": (torch.randn(vocab, hidden, generator=g) * 0.02).to(dtype),
            }
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        del tensors
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    index = {"metadata": {"total_size": params * dtype.itemsize}, "weight_map": weight_map}
    index_path.write_text(json.dumps(index, indent=2))
    return params


def write_onnx_mlp(
    folder: Path, blocks: int, hidden: int, inter: int, seed: int = 0, tokens: int = 16
) -> int:
    """``folder/model.onnx``: ``blocks`` residual MLP blocks (x + Relu(x W_up) W_down, fp32,
    random weights) over a (1, tokens, hidden) input, every weight in external data
    (``model.onnx.data``), written one tensor at a time so writing never holds the model; returns
    its parameter count. Reuses a complete file written with the same arguments."""
    import onnx
    from onnx import TensorProto, helper

    params = blocks * 2 * hidden * inter
    path, data = folder / "model.onnx", folder / "model.onnx.data"
    stamp = folder / "args.json"
    args = {"blocks": blocks, "hidden": hidden, "inter": inter, "seed": seed, "tokens": tokens}
    if path.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == args:
        return params
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    initializers, nodes, offset = [], [], 0
    x = "x"
    with data.open("wb") as f:
        for i in range(blocks):
            for name, shape in ((f"up.{i}", (hidden, inter)), (f"down.{i}", (inter, hidden))):
                w = (rng.standard_normal(shape, dtype=np.float32) * 0.02).tobytes()
                f.write(w)
                t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=shape)
                t.data_location = TensorProto.EXTERNAL
                for key, value in (("location", data.name), ("offset", offset), ("length", len(w))):
                    entry = t.external_data.add()
                    entry.key, entry.value = key, str(value)
                initializers.append(t)
                offset += len(w)
                del w
            nodes += [
                helper.make_node("MatMul", [x, f"up.{i}"], [f"h.{i}"], name=f"blocks.{i}.up"),
                helper.make_node("Relu", [f"h.{i}"], [f"r.{i}"], name=f"blocks.{i}.relu"),
                helper.make_node(
                    "MatMul", [f"r.{i}", f"down.{i}"], [f"d.{i}"], name=f"blocks.{i}.down"
                ),
                helper.make_node("Add", [x, f"d.{i}"], [f"y.{i}"], name=f"blocks.{i}.add"),
            ]
            x = f"y.{i}"
    nodes.append(helper.make_node("Identity", [x], ["y"]))
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, tokens, hidden])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, tokens, hidden])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path.write_bytes(model.SerializeToString())
    onnx.checker.check_model(str(path))
    stamp.write_text(json.dumps(args))
    return params


def calibration_file(work: Path, tokens: str, vocab: int) -> Path:
    """N random-token windows of T tokens (``tokens`` = "NxT", seed 0) as a calibration .npz."""
    n, t = (int(v) for v in tokens.split("x"))
    path = work / f"calib-{n}x{t}-v{vocab}.npz"
    if not path.is_file():
        g = np.random.default_rng(0)
        ids = g.integers(0, vocab, (n, 1, t))
        np.savez(path, input_ids=ids, attention_mask=np.ones((n, 1, t), dtype=np.int64))
    return path


def measure(cmd: list[str], interval: float = 0.02) -> dict:
    """Run ``cmd``; its peak RssAnon and VmHWM (sampled), wall time and exit status."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak_anon = peak_hwm = 0
    while proc.poll() is None:
        s = memory(proc.pid)
        peak_anon, peak_hwm = max(peak_anon, s["RssAnon"]), max(peak_hwm, s["VmHWM"])
        time.sleep(interval)
    wall = time.perf_counter() - t0
    output = proc.stdout.read() if proc.stdout else ""
    return {
        "rc": proc.returncode,
        "peak_anon": peak_anon,
        "peak_hwm": peak_hwm,
        "seconds": round(wall, 1),
        "tail": output[-2000:],
    }


def time_split(report: dict) -> dict:
    """Where a streamed run's time went: the median seconds of a block stage and of each pass in
    it."""
    stages = report.get("stages", [])
    blocks = [s for s in stages if s["stage"].startswith("model.layers.")]
    if not blocks:
        return {}
    passes = {name for s in blocks for name in s.get("passes", {})}
    return {
        "block_seconds": float(np.median([s["seconds"] for s in blocks])),
        "pass_seconds": {
            p: float(np.median([s["passes"][p].get("seconds", 0.0) for s in blocks]))
            for p in sorted(passes)
        },
    }


def run(args) -> dict:
    rows = []
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    for blocks in [int(b) for b in args.blocks.split(",")]:
        t0 = time.perf_counter()
        if args.onnx:
            folder = work / f"mlp-h{args.hidden}-b{blocks}"
            params = write_onnx_mlp(folder, blocks, args.hidden, args.inter)
            model = folder / "model.onnx"
        else:
            folder = work / f"llama-h{args.hidden}-b{blocks}"
            params = write_llama(folder, blocks, args.hidden, args.inter, args.heads, args.vocab)
            model = folder
        written = time.perf_counter() - t0
        out = work / f"out-{folder.name}"
        cmd = [sys.executable, "-m", "effc.cli", "compile", str(model), "--passes", args.passes]
        cmd += ["--target", args.target, "-o", str(out), "--force", *shlex.split(args.extra_args)]
        if args.calib_tokens:
            cmd += ["--calib", str(calibration_file(work, args.calib_tokens, args.vocab))]
        got = measure(cmd)
        row = {
            "blocks": blocks,
            "params": params,
            "write_seconds": round(written, 1),
            **{k: v for k, v in got.items() if k != "tail"},
            "bytes_per_param": round(got["peak_anon"] / params, 2),
        }
        if got["rc"] != 0:
            row["error"] = got["tail"].strip().splitlines()[-1] if got["tail"].strip() else ""
        elif (out / "report.json").is_file():
            row.update(time_split(json.loads((out / "report.json").read_text())))
        rows.append(row)
        print(row, flush=True)
    return {
        "onnx": bool(args.onnx),
        "shape": {k: getattr(args, k) for k in ("hidden", "inter", "heads", "vocab")},
        "passes": args.passes,
        "target": args.target,
        "extra_args": args.extra_args,
        "calib_tokens": args.calib_tokens,
        "threads": os.environ.get("EFFC_THREADS", "default"),
        "rows": rows,
    }


def markdown(data: dict, command: str) -> str:
    gib = 1024**3
    model = (
        "ONNX files of residual MLP blocks (fp32, every weight in external data; "
        f"hidden {data['shape']['hidden']}, inner {data['shape']['inter']})"
        if data.get("onnx")
        else f"LLaMA-shaped bf16 folders ({data['shape']})"
    )
    lines = [
        f"`effc compile` peak memory against blocks: random-weight {model}, "
        f"passes `{data['passes']}`, target {data['target']} "
        f"{data['extra_args']}"
        + (
            f", calibration {data['calib_tokens']} random tokens"
            if data.get("calib_tokens")
            else ""
        )
        + ".",
        "",
        f"`{command}`",
        "",
        "| blocks | parameters | peak RssAnon GiB | peak VmHWM GiB | bytes/param | seconds | status |",
        "|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in data["rows"]:
        status = "ok" if r["rc"] == 0 else f"exit {r['rc']}: {r.get('error', '')}"
        lines.append(
            f"| {r['blocks']} | {r['params'] / 1e6:,.0f} M | {r['peak_anon'] / gib:.2f} | "
            f"{r['peak_hwm'] / gib:.2f} | {r['bytes_per_param']} | {r['seconds']} | {status} |"
        )
    timed = [r for r in data["rows"] if r.get("block_seconds")]
    if timed:
        lines += [
            "",
            "Where the time goes (streamed: median per block stage, from each run's report.json; "
            "the rest is the embeddings, the head and start-up), and the time a 32-block "
            "(LLaMA-7B) model takes at that rate:",
            "",
            "| blocks | s per block | of which, per pass | outside the blocks s | "
            "32 blocks, extrapolated s |",
            "|---:|---:|---|---:|---:|",
        ]
        for r in timed:
            split = ", ".join(f"{p} {s:.1f}" for p, s in r["pass_seconds"].items())
            rest = r["seconds"] - r["blocks"] * r["block_seconds"]
            lines.append(
                f"| {r['blocks']} | {r['block_seconds']:.1f} | {split} | {rest:.1f} | "
                f"{32 * r['block_seconds'] + rest:.0f} |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", default="2,4,8")
    ap.add_argument("--hidden", type=int, default=LLAMA_7B["hidden"])
    ap.add_argument("--inter", type=int, default=LLAMA_7B["inter"])
    ap.add_argument("--heads", type=int, default=LLAMA_7B["heads"])
    ap.add_argument("--vocab", type=int, default=LLAMA_7B["vocab"])
    ap.add_argument("--passes", default="quantize{bits=4,group=16}")
    ap.add_argument("--target", default="bsr")
    ap.add_argument("--calib-tokens", default="", help="NxT random-token calibration windows")
    ap.add_argument("--extra-args", default="")
    ap.add_argument(
        "--onnx",
        action="store_true",
        help="ONNX files with external data (residual MLP blocks) instead of HF folders",
    )
    ap.add_argument("--work", default="/tmp/effc-scale")
    ap.add_argument("--out", default="tools/bench/results/scale")
    args = ap.parse_args()
    data = run(args)
    command = "python -m tools.bench.scale " + " ".join(
        f"--{k.replace('_', '-')} {shlex.quote(str(getattr(args, k)))}"
        for k in ("blocks", "hidden", "inter", "heads", "vocab", "passes", "target")
    )
    if args.calib_tokens:
        command += f" --calib-tokens {args.calib_tokens}"
    if args.onnx:
        command += " --onnx"
    if args.extra_args:
        command += f" --extra-args={shlex.quote(args.extra_args)}"  # "=": argparse takes "--stream" for an option
    save(args.out, data, markdown(data, command))


if __name__ == "__main__":
    main()
