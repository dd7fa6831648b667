"""One picture to choose a SmolLM2-135M recipe from: perplexity against linear-layer bytes and
against decode speed, every committed row, with the Pareto front marked.

    python -m tools.quality.pareto [--out tools/quality/results/smollm2_pareto]

Reads the committed tables, runs nothing: perplexity and bytes from
``tools/quality/results/smollm2_perplexity.json`` (every row, GQSA and FoldGPT alike), decode
speed from ``tools/bench/results/decode_smollm2.json`` (fp32, W4, W4S50) and
``decode_smollm2_fold.json`` (removal, sharing, each with W4). Speed is a property of the stored
format (blocks kept, bits, group, group sparsity), not of how the weights were trained, so a row
takes the decode speedup over fp32 (effc's loop, measured in the same run as its fp32 baseline) of
the format it stores; 2:4 rows are stored and run dense here (no 2:4 CPU kernel), so they decode at
fp32 speed; rows of a format no decode run measured (W4 g32/g64, S30/S40, W3) are in the bytes
panel only. A row is on the front when no other row has both fewer (or equal) bytes, or more (or
equal) speed, and a lower perplexity.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from tools.results import save

PERPLEXITY = Path("tools/quality/results/smollm2_perplexity.json")
DECODE = (
    Path("tools/bench/results/decode_smollm2.json"),
    Path("tools/bench/results/decode_smollm2_fold.json"),
)
LOOP = "effc static cache"


def _option(text: str, pass_name: str, key: str) -> str | None:
    m = re.search(rf"(?<![\w-]){re.escape(pass_name)}(?:\{{([^}}]*)\}})?(?=,|$)", text)
    if m is None:
        return None
    for part in (m.group(1) or "").split(","):
        k, _, v = part.partition("=")
        if k.strip() == key:
            return v.strip()
    return ""  # the pass runs with this option at its default


def format_of(pipeline: str) -> tuple:
    """What decode speed depends on: (blocks removed, sharing group, bits, group, sparsity)."""
    removed = int(_option(pipeline, "remove-blocks", "count") or 0)
    shared = int(_option(pipeline, "share-blocks", "group") or 0)
    bits = _option(pipeline, "quantize", "bits")
    bits = None if bits is None else int(bits or 4)
    group = _option(pipeline, "quantize", "group") if bits else None
    group = None if group is None else int(group or 16)
    sparsity = _option(pipeline, "group-prune", "sparsity")
    sparsity = float(sparsity) if sparsity else 0.0
    return removed, shared, bits, group, sparsity


def family(row: dict) -> str:
    text = row["pipeline"]
    if "remove-blocks" in text or "share-blocks" in text:
        return "FoldGPT (removal / sharing)" + (" + W4" if "quantize" in text else "")
    if "nm-prune" in text:
        return "2:4"
    if "group-prune" in text:
        return "GQSA groups" + (" + W4" if "quantize" in text else "")
    if "quantize" in text:
        return "W4/W3/W2 (no pruning)"
    return "fp32"


def speeds() -> dict[tuple, dict]:
    """Decode speedup over fp32 in the same run, by stored format."""
    out = {}
    for path in DECODE:
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        pipelines = {k: v["pipeline"] for k, v in data["meta"]["compressed"].items()}
        for r in data["rows"]:
            if r["loop"] != LOOP or "dequantized" in r["config"] or "int8 x" in r["config"]:
                continue
            labels = [k for k in pipelines if r["config"].startswith(f"{k} ")]
            label = max(labels, key=len) if labels else None  # "remove 6 + W4", not "remove 6"
            key = format_of(pipelines[label]) if label else format_of("-")
            out.setdefault(
                key,
                {
                    "speedup": r["speedup_vs_fp32"],
                    "tokens_per_s": r["tokens_per_s"],
                    "source": f"{path.name}: {r['config']}",
                },
            )
    return out


def front(points: list[tuple[float, float]], more_is_better: bool) -> list[bool]:
    """Per point (x, perplexity): True where no other point is at least as good in x and has a
    lower perplexity."""
    flags = []
    for i, (x, p) in enumerate(points):
        dominated = any(
            j != i and (x2 >= x if more_is_better else x2 <= x) and p2 < p
            for j, (x2, p2) in enumerate(points)
        )
        flags.append(not dominated)
    return flags


def build() -> tuple[dict, list[dict]]:
    data = json.loads(PERPLEXITY.read_text())
    by_format = speeds()
    rows = []
    for r in data["rows"]:
        fmt = format_of(r["pipeline"])
        if "nm-prune" in r["pipeline"]:
            fmt = format_of("-")  # stored and decoded dense here
        speed = by_format.get(fmt)
        rows.append(
            {
                "setting": r["setting"],
                "pipeline": r["pipeline"],
                "family": family(r),
                "perplexity": r["perplexity"],
                "linear_MB": sum(r["bytes"].values()) / 1e6,
                "speedup": None if speed is None else speed["speedup"],
                "speed_from": None if speed is None else speed["source"],
                "compress_s": r.get("compress_s"),
            }
        )
    on_bytes = front([(r["linear_MB"], r["perplexity"]) for r in rows], more_is_better=False)
    timed = [r for r in rows if r["speedup"] is not None]
    on_speed = front([(r["speedup"], r["perplexity"]) for r in timed], more_is_better=True)
    for r, flag in zip(rows, on_bytes):
        r["front_bytes"] = flag
    for r, flag in zip(timed, on_speed):
        r["front_speed"] = flag
    return {"perplexity_table": str(PERPLEXITY), "decode_tables": [str(p) for p in DECODE]}, rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 6))
    families = sorted({r["family"] for r in rows})
    colors = dict(zip(families, plt.cm.tab10.colors))
    for ax, x, flag, label in (
        (axes[0], "linear_MB", "front_bytes", "linear-layer MB (fewer is better)"),
        (axes[1], "speedup", "front_speed", "decode speedup over fp32, effc loop (more is better)"),
    ):
        shown = [r for r in rows if r.get(x) is not None]
        for fam in families:
            pts = [r for r in shown if r["family"] == fam]
            if pts:
                ax.scatter(
                    [r[x] for r in pts],
                    [r["perplexity"] for r in pts],
                    s=30,
                    color=colors[fam],
                    label=fam,
                )
        best = sorted((r for r in shown if r.get(flag)), key=lambda r: r[x])
        ax.plot(
            [r[x] for r in best],
            [r["perplexity"] for r in best],
            "k--",
            lw=1,
            label="Pareto front",
        )
        for r in best:
            ax.annotate(r["setting"][:40], (r[x], r["perplexity"]), fontsize=6, alpha=0.8)
        ax.set_yscale("log")
        if x == "linear_MB":
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("perplexity (16 x 512 evaluation tokens)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("SmolLM2-135M: every committed recipe")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def to_markdown(meta: dict, rows: list[dict], png: str) -> str:
    lines = [
        "# SmolLM2-135M: perplexity against bytes and decode speed, the Pareto front",
        "",
        "Command: `python -m tools.quality.pareto` (reads the committed tables; runs nothing).  ",
        f"Perplexity and bytes: `{meta['perplexity_table']}`; decode speed: "
        + ", ".join(f"`{p}`" for p in meta["decode_tables"])
        + " (speedup over fp32 in effc's loop, same run; a row takes its stored format's speed, "
        "2:4 decodes dense; blank where no decode run measured its format).",
        "",
        f"![perplexity against bytes and speed]({png})",
        "",
        "| setting | family | perplexity | linear MB | decode speedup | front (bytes) | "
        "front (speed) | compress s |",
        "|---|---|---:|---:|---:|---|---|---:|",
    ]
    for r in sorted(rows, key=lambda r: r["linear_MB"]):
        speed = "" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        seconds = "" if r["compress_s"] is None else f"{r['compress_s']:.0f}"
        lines.append(
            f"| {r['setting']} | {r['family']} | {r['perplexity']:.4g} | {r['linear_MB']:.1f} | "
            f"{speed} | {'yes' if r['front_bytes'] else ''} | "
            f"{'yes' if r.get('front_speed') else ''} | {seconds} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="tools/quality/results/smollm2_pareto")
    args = parser.parse_args()
    meta, rows = build()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.with_name(out.name + ".png")
    plot(rows, png)
    save(out, {"meta": meta, "rows": rows}, to_markdown(meta, rows, png.name))


if __name__ == "__main__":
    main()
