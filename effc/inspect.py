"""``effc inspect``: what a model is made of (ops, parameters, bytes, sparsity, blocks, I/O)."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from effc.ir.blocks import find_blocks
from effc.ir.sites import read_weight, weight_sites


def inspect_model(model) -> dict:
    params, nbytes = model.param_stats()
    sites = weight_sites(model)
    info = {
        "source": model.source,
        "kind": model.kind,
        "inputs": [vars(s) for s in model.input_specs()],
        "ops": model.op_histogram(),
        "nodes": sum(model.op_histogram().values()),
        "params": params,
        "bytes": nbytes,
        "blocks": [b.fqn for b in find_blocks(sites)],
        "weights": [],
    }
    if model.kind == "onnx":
        m = model.model
        info["opset"] = {d or "ai.onnx": v for d, v in m.opset_imports.items()}
        info["ir_version"] = m.ir_version
        info["producer"] = f"{m.producer_name or ''} {m.producer_version or ''}".strip()
        info["outputs"] = [
            {
                "name": v.name,
                "shape": [d if isinstance(d, int) else str(d) for d in (v.shape or [])],
                "dtype": v.dtype.numpy().name if v.dtype is not None else None,
            }
            for v in m.graph.outputs
        ]
    for site in sites:
        w = read_weight(site)
        info["weights"].append(
            {
                "name": site.fqn,
                "op": site.op,
                "shape": list(site.shape),
                "sparsity": float((w == 0).sum()) / max(w.numel(), 1),
                "tied_with": site.tied_with,
            }
        )
    return info


def print_inspection(info: dict, console: Console) -> None:
    head = f"{escape(info['source'])}: {info['kind'].upper()}, {info['nodes']} nodes, "
    head += f"{info['params']:,} parameters, {info['bytes'] / 2**20:.2f} MiB"
    if "opset" in info:
        head += f", opset {info['opset']}, IR v{info['ir_version']}, producer {escape(info['producer'] or '?')}"
    console.print(head)
    io = Table(title="inputs / outputs", title_justify="left")
    for col in ("", "name", "shape", "dtype"):
        io.add_column(col)
    for kind, items in (("input", info["inputs"]), ("output", info.get("outputs", []))):
        for s in items:
            io.add_row(kind, escape(s["name"]), str(s["shape"]), str(s["dtype"]))
    console.print(io)
    ops = Table(title="op histogram", title_justify="left")
    ops.add_column("op")
    ops.add_column("count", justify="right")
    for op, n in sorted(info["ops"].items(), key=lambda kv: -kv[1]):
        ops.add_row(escape(op), str(n))
    console.print(ops)
    if info["weights"]:
        w = Table(title="weight sites (out x in view)", title_justify="left")
        for col in ("name", "op", "shape", "sparsity", "tied with"):
            w.add_column(col, justify="right" if col == "sparsity" else "left")
        for s in info["weights"]:
            w.add_row(
                escape(s["name"]),
                s["op"],
                "x".join(map(str, s["shape"])),
                f"{s['sparsity']:.1%}",
                ", ".join(s["tied_with"]),
            )
        console.print(w)
    if info["blocks"]:
        console.print(
            f"blocks: {len(info['blocks'])} ({info['blocks'][0]} .. {info['blocks'][-1]})"
        )
