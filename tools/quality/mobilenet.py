"""MobileNetV2 (torchvision's ImageNet weights) under kernel-sparsity: top-1/top-5 agreement with
the dense model and the mean KL divergence of its predictions, on crops of held-out photographs.

Calibration and recovery use crops of ``CALIBRATION`` images, evaluation crops of the other
``EVALUATION`` images (effc.models.images): no image is in both. There are no ImageNet labels
offline, so agreement with the dense model stands in for accuracy: top-1 agreement is the share
of crops where both predict the same class, top-5 the share where the dense model's top class is
in the pruned model's top 5.

    python -m tools.quality.mobilenet [--eval 1000] [--calib 256] [--levels 0.3,0.5,0.7] \\
        [--methods "obs + sensitivity;..."] [--out tools/quality/results/mobilenet_v2_sparsity]
    python -m tools.quality.mobilenet --merge A,B,... [--out tools/quality/results/mobilenet_v2_quality]

``--merge`` runs nothing: it puts the rows of committed tables (results files without their
``.json``) into one table by sparsity, with whether each method rearranges and recovers, and the
command that made each row.
"""

from __future__ import annotations

import argparse
import os
import time

THREADS = int(os.environ.get("EFFC_THREADS", "2"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from effc.cache import cache_dir  # noqa: E402
from effc.context import PassContext  # noqa: E402
from effc.models import load_mobilenet_v2  # noqa: E402
from effc.models.images import calibration_crops, evaluation_crops  # noqa: E402
from effc.pipeline import Pipeline  # noqa: E402
from effc.synthetic import synthesize  # noqa: E402
from tools.results import save  # noqa: E402

PATTERNS = "patterns=[pointwise:8x1,linear:8x1,conv:kernel]"


def configs(sparsity: float, recover_steps: int) -> list[tuple[str, str]]:
    base = f"kernel-sparsity{{sparsity={sparsity},{PATTERNS}"
    rearrange = f"rearrange{{target=blocks,rows=8,sparsity={sparsity}}},"
    rows = [
        ("magnitude", base + "}"),
        ("rearrange + magnitude", rearrange + base + "}"),
        ("obs", base + ",score=obs}"),
        ("obs + sensitivity", base + ",score=obs,allocate=sensitivity}"),
        ("rearrange + obs + sensitivity", rearrange + base + ",score=obs,allocate=sensitivity}"),
        (
            "obs + sensitivity + sequential",
            base + ",score=obs,allocate=sensitivity,sequential=true}",
        ),
        (
            "rearrange + obs + sensitivity + sequential",
            rearrange + base + ",score=obs,allocate=sensitivity,sequential=true}",
        ),
    ]
    if recover_steps:
        recover = f",score=obs,allocate=sensitivity}},recover{{steps={recover_steps},lr=3e-5}}"
        rows.append(("obs + sensitivity + recover", base + recover))
        rows.append(("rearrange + obs + sensitivity + recover", rearrange + base + recover))
    return rows


def agreement(ref: torch.Tensor, got: torch.Tensor) -> dict:
    top1 = (ref.argmax(-1) == got.argmax(-1)).float().mean()
    top5 = (got.topk(5, -1).indices == ref.argmax(-1, keepdim=True)).any(-1).float().mean()
    kl = torch.nn.functional.kl_div(
        got.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="batchmean"
    )
    return {"top1": float(top1), "top5": float(top5), "kl": float(kl)}


def logits(model, x: torch.Tensor, chunk: int = 50) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(x[i : i + chunk]) for i in range(0, len(x), chunk)])


SOURCES = ("photos", "synthetic", "both")
CALIBRATION_TEXT = {
    "photos": "crops of other photographs",
    "synthetic": "images synthesized from the dense model's BatchNorm statistics (no photographs)",
    "both": "calibration images, half crops of other photographs and half synthesized from the "
    "dense model's BatchNorm statistics",
}


def synthetic_images(count: int, steps: int) -> tuple[np.ndarray, dict]:
    """``count`` images synthesized from the dense model's BatchNorm statistics (effc.synthetic),
    kept in the cache folder: every method and level of a run, and later runs, reuse them (the
    first ``count`` of a larger set are the same images: batches are made in turn, one seed)."""
    folder = cache_dir() / "synthetic"
    for path in sorted(folder.glob(f"mobilenet_v2_*x{steps}.npz")):
        if int(path.name.split("_")[2].split("x")[0]) >= count:
            saved = np.load(path, allow_pickle=False)
            return saved["images"][:count], {
                "cached": str(path),
                "seconds": float(saved["seconds"]),
            }
    images, report = synthesize(load_mobilenet_v2(), (3, 224, 224), count, steps=steps)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"mobilenet_v2_{count}x{steps}.npz"
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, images=images, seconds=report["seconds"])
    tmp.replace(path)
    return images, report


def calibration_images(n_calib: int, source: str, steps: int) -> tuple[np.ndarray, dict]:
    """The calibration crops: photographs, synthesized images, or half of each (``both``)."""
    if source == "photos":
        return calibration_crops(n_calib), {}
    n_synth = n_calib if source == "synthetic" else n_calib // 2
    images, report = synthetic_images(n_synth, steps)
    if source == "both":
        images = np.concatenate([calibration_crops(n_calib - n_synth), images])
    return images, report


def run(
    levels,
    n_eval: int,
    n_calib: int,
    recover_steps: int,
    methods=None,
    source: str = "photos",
    synth_steps: int = 200,
) -> dict:
    torch.set_num_threads(THREADS)
    x = torch.from_numpy(evaluation_crops(n_eval))
    images, synthesis = calibration_images(n_calib, source, synth_steps)
    calib = [{"pixels": c[None]} for c in images]
    ref = logits(load_mobilenet_v2(), x)
    rows = []
    for sp in levels:
        for label, text in configs(sp, recover_steps):
            if methods and label not in methods:
                continue
            t0 = time.time()
            ctx = PassContext(calibration=calib)
            result = Pipeline.from_text(text).run(load_mobilenet_v2(), ctx)
            stats = next(r.stats for r in result.report.records if r.name == "kernel-sparsity")
            row = {
                "sparsity": sp,
                "method": label,
                "calibration": source,
                "pipeline": text,
                "achieved": stats["sparsity"],
                **agreement(ref, logits(result.model.runner, x)),
                "seconds": round(time.time() - t0, 1),
            }
            rows.append(row)
            print(row, flush=True)
    return {
        "model": "MobileNetV2, torchvision IMAGENET1K_V1 weights",
        "eval_crops": n_eval,
        "calib_crops": n_calib,
        "calib_source": source,
        "synthesis": synthesis,
        "threads": THREADS,
        "rows": rows,
    }


def markdown(data: dict, command: str) -> str:
    lines = [
        f"MobileNetV2 kernel sparsity ({PATTERNS}; depthwise dense): agreement with the dense "
        f"model on {data['eval_crops']} crops of held-out photographs, calibration/recovery on "
        f"{data['calib_crops']} {CALIBRATION_TEXT[data.get('calib_source', 'photos')]}.",
        "",
        f"`{command}`",
        "",
        "| sparsity | method | achieved | top-1 agreement | top-5 | KL | seconds |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in data["rows"]:
        lines.append(
            f"| {r['sparsity']:.0%} | {r['method']} | {r['achieved']:.4f} | {r['top1']:.1%} | "
            f"{r['top5']:.1%} | {r['kl']:.3f} | {r['seconds']} |"
        )
    return "\n".join(lines)


def merge(paths: list[str]) -> tuple[dict, str]:
    """One table of the rows of several committed results (same model, crops and patterns)."""
    import json
    from pathlib import Path

    tables = []
    for path in paths:
        data = json.loads(Path(path + ".json").read_text())
        text = Path(path + ".md").read_text().splitlines()
        command = next((line.strip("`") for line in text if line.startswith("`python")), "")
        tables.append((Path(path).name, data, command))
    settings = {(d["model"], d["eval_crops"], d["calib_crops"]) for _, d, _ in tables}
    if len(settings) != 1:
        raise SystemExit(f"the tables were made with different settings: {sorted(settings)}")
    rows = [
        {"calibration": d.get("calib_source", "photos"), **r, "table": name}
        for name, d, _ in tables
        for r in d["rows"]
    ]
    rows.sort(key=lambda r: (r["sparsity"], r["top1"], r["kl"] * -1))
    first = tables[0][1]
    data = {**{k: v for k, v in first.items() if k != "rows"}, "rows": rows}
    lines = [
        f"MobileNetV2 kernel sparsity ({PATTERNS}; depthwise dense), every committed row in one "
        f"table: agreement with the dense model on {first['eval_crops']} crops of held-out "
        f"photographs, calibration/recovery on {first['calib_crops']} images: crops of other "
        "photographs, images synthesized from the dense model's BatchNorm statistics, or half of "
        "each (the calibration column). No ImageNet labels offline; see docs/results.md.",
        "",
        "`python -m tools.quality.mobilenet --merge " + ",".join(paths) + "`",
        "",
        "| sparsity | method | calibration | rearranged | recovered | top-1 agreement | top-5 | KL "
        "| seconds | table |",
        "|---:|---|---|---|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['sparsity']:.0%} | {r['method']} | {r['calibration']} | "
            f"{'yes' if 'rearrange' in r['method'] else 'no'} | "
            f"{'yes' if 'recover' in r['method'] else 'no'} | {r['top1']:.1%} | "
            f"{r['top5']:.1%} | {r['kl']:.3f} | {r['seconds']} | {r['table']} |"
        )
    lines += ["", "Tables and the commands that made them:", ""]
    lines += [f"- `{name}`: `{command}`" for name, _, command in tables]
    return data, "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eval", type=int, default=1000)
    ap.add_argument("--calib", type=int, default=256)
    ap.add_argument("--recover-steps", type=int, default=300)
    ap.add_argument("--calib-source", choices=SOURCES, default="photos")
    ap.add_argument("--synth-steps", type=int, default=200, help="steps per synthesized batch")
    ap.add_argument("--levels", default="0.3,0.5,0.7")
    ap.add_argument("--methods", default="", help="';'-separated method labels (all by default)")
    ap.add_argument("--out", default="")
    ap.add_argument("--merge", default="", help="','-separated committed results to put together")
    args = ap.parse_args()
    if args.merge:
        data, text = merge(args.merge.split(","))
        save(args.out or "tools/quality/results/mobilenet_v2_quality", data, text)
        return
    args.out = args.out or "tools/quality/results/mobilenet_v2_sparsity"
    levels = [float(v) for v in args.levels.split(",")]
    methods = [m.strip() for m in args.methods.split(";") if m.strip()]
    data = run(
        levels,
        args.eval,
        args.calib,
        args.recover_steps,
        methods,
        args.calib_source,
        args.synth_steps,
    )
    command = (
        (
            f"python -m tools.quality.mobilenet --eval {args.eval} --calib {args.calib} "
            f"--recover-steps {args.recover_steps} --levels {args.levels}"
        )
        + (
            f" --calib-source {args.calib_source} --synth-steps {args.synth_steps}"
            if args.calib_source != "photos"
            else ""
        )
        + (f' --methods "{args.methods}"' if methods else "")
    )
    if args.out != "tools/quality/results/mobilenet_v2_sparsity":
        command += f" --out {args.out}"
    save(args.out, data, markdown(data, command))


if __name__ == "__main__":
    main()
