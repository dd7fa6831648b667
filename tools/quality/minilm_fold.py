"""FoldGPT on an encoder: all-MiniLM-L6-v2 (6 BERT blocks) with blocks removed (scored by gates,
cosine or at random) and shared in pairs, before and after a cure; Lee-pairs correlation,
embedding drift, bytes and sentences/s of the lowered ONNX model, in one table.

    python -m tools.quality.minilm_fold [--seq 128] [--calib 32] [--cure-steps 200] \\
        [--out tools/quality/results/minilm_fold]

Quality: mean-pooled, L2-normalised embeddings of gensim's 50 Lee documents (``--seq`` tokens),
from onnxruntime running each row's lowered ONNX model (the deployable form, so the file it
measures is the file it times); Pearson correlation of the 1,225 pairwise cosines with the human
ratings (fp32: 0.656 at 256 tokens in DATA.md) and the cosine of each embedding to the fp32 one.
Calibration (cosine scores, gate training, cure): ``--calib`` windows of ``--seq`` tokens of the
Wikipedia calibration articles, never the Lee documents. Speed: sentences/s at batch 1, every
row's session timed in one process run, interleaved (``interleaved_medians(paired=True)``), with
the ratio to fp32; rows whose graphs differ only in weights (same depth, same sharing) are timed
once, by the first such row's session, so the few distinct graphs get many trials each. Each
row is one pipeline on a fresh copy of the model.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

THREADS = int(os.environ.get("EFFC_THREADS", "2"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from tools.results import save  # noqa: E402

CURE = "cure{steps=STEPS,distill=both,layers=1,samples=CALIB}"
GATES = "block-gates{method=scale,steps=64,lr=0.05,samples=CALIB,rate=RATE}"
# sampled gates: each step draws 4 removals of COUNT blocks from the gates, judged by their drift
SAMPLED = "block-gates{count=COUNT,steps=64,samples=CALIB,polish=0}"
# GQSA on the encoder: W4 in groups of 16 (GPTQ), then E2E-OQP distilling the output hidden
# states (an encoder has no next-token loss: loss=auto picks the distance to the original's)
W4 = "quantize{bits=4,group=16,method=gptq}"
E2E = "gqsa-train{stage=e2e,steps=STEPS,lr=0.0003,samples=CALIB}"


def rows() -> list[tuple[str, str]]:
    out = [("fp32", "")]
    for count in (1, 2, 3):
        rate = round(count / 6, 3)
        gates = GATES.replace("RATE", str(rate))
        for score in ("gates", "cosine", "random"):
            head = f"{gates}," if score == "gates" else ""
            text = f"{head}remove-blocks{{count={count},score={score}}}"
            out.append((f"remove {count} ({score})", text))
            if score != "random":
                out.append((f"remove {count} ({score}) + cure", f"{text},{CURE}"))
    for count in (1, 2):
        gates = SAMPLED.replace("COUNT", str(count))
        text = f"{gates},remove-blocks{{count={count},score=gates}}"
        out.append((f"remove {count} (gates, sampled)", text))
        out.append((f"remove {count} (gates, sampled) + cure", f"{text},{CURE}"))
    for count in (1, 2):  # the same gates, then block-gates' default swap search (polish)
        gates = SAMPLED.replace("COUNT", str(count)).replace(",polish=0", "")
        text = f"{gates},remove-blocks{{count={count},score=gates}}"
        out.append((f"remove {count} (gates + polish)", text))
        out.append((f"remove {count} (gates + polish) + cure", f"{text},{CURE}"))
    # fit: the least-squares weight for both blocks' outputs on the calibration sentences
    for choose in ("first", "mean", "fit", "fit,sequential=true"):
        text = f"share-blocks{{group=2,choose={choose}}}"
        label = choose.replace(",sequential=true", ", sequential")
        out.append((f"share pairs ({label})", text))
        out.append((f"share pairs ({label}) + cure", f"{text},{CURE}"))
    gates = GATES.replace("RATE", str(round(2 / 6, 3)))
    out.append(
        (
            "remove 2 (gates) + share pairs + cure",
            f"{gates},remove-blocks{{count=2,score=gates}},share-blocks{{group=2}},{CURE}",
        )
    )
    out.append(("W4 g16 (GPTQ)", W4))
    out.append(("W4 g16 (GPTQ) + E2E-OQP", f"{W4},{E2E}"))
    recipe = f"remove-blocks{{count=1,score=cosine}},{CURE},{W4},{E2E}"
    out.append(("remove 1 (cosine) + cure + W4 g16 + E2E-OQP", recipe))
    # the same E2E with an eighth of the calibration windows held out: it ends at its best check
    held = E2E.replace("samples=CALIB}", "samples=CALIB,holdout=HOLDOUT}")
    out.append(("W4 g16 (GPTQ) + E2E-OQP, held out", f"{W4},{held}"))
    recipe = f"remove-blocks{{count=1,score=cosine}},{CURE},{W4},{held}"
    out.append(("remove 1 (cosine) + cure + W4 g16 + E2E-OQP, held out", recipe))
    return out


def run(
    seq: int, n_calib: int, cure_steps: int, trials: int, only: list[str] | None = None
) -> dict:
    import onnx_ir as ir
    from transformers import AutoTokenizer

    import effc
    from effc.ir import FxModel
    from effc.ir.onnx_io import save_onnx
    from effc.ir.ort import open_session, session_options
    from effc.ir.torch_io import load_hf_folder
    from effc.models.real import minilm_folder
    from effc.pipeline import lower_to_onnx
    from effc.runtime.cpu import kernels
    from effc.runtime.timing import interleaved_medians
    from tools.bench.bsr_linear import bandwidth
    from tools.quality.norms import lee_inputs, lee_pearson, pooled

    folder = minilm_folder()
    encoded, ratings, calib = lee_inputs(AutoTokenizer.from_pretrained(folder), seq, n_calib)
    results, base = [], None
    sessions: dict[tuple[int, int], object] = {}  # one timed session per distinct graph
    chosen = [(label, text) for label, text in rows() if not only or label in only or not text]
    unknown = set(only or []) - {label for label, _ in rows()}
    if unknown:
        raise SystemExit(f"unknown rows: {sorted(unknown)}")
    for label, text in chosen:
        text = text.replace("STEPS", str(cure_steps)).replace("CALIB", str(n_calib))
        text = text.replace("HOLDOUT", str(max(1, n_calib // 8)))
        module, inputs = load_hf_folder(folder, seq=seq)
        model = FxModel(module, inputs)
        t0 = time.perf_counter()
        result = None
        if text:
            result = effc.Pipeline.from_text(text).run(model, effc.PassContext(calibration=calib))
            model = result.model
        seconds = time.perf_counter() - t0
        block_params = sum(p.numel() for p in model.module.encoder.parameters())
        onnx_model = lower_to_onnx(model)
        with tempfile.TemporaryDirectory() as tmp:
            files = save_onnx(onnx_model.model, Path(tmp) / "model.onnx")
            nbytes = sum(f.stat().st_size for f in files)
        # no spinning threads: a spinning pool slows the next session timed (ir/ort.py)
        session = open_session(
            ir.serde.serialize_model(onnx_model.model).SerializeToString(),
            session_options(THREADS, spinning=False),
        )
        names = [i.name for i in session.get_inputs()]
        emb = np.stack(
            [
                pooled(session.run(None, {k: f[k] for k in names})[0][0], f["attention_mask"][0])
                for f in encoded
            ]
        )
        base = emb if base is None else base
        cos = (emb * base).sum(1)
        removed = (
            next(
                (r.stats["removed"] for r in result.report.records if r.name == "remove-blocks"),
                [],
            )
            if result
            else []
        )
        weights = read_once_bytes(onnx_model.model)
        row = {
            "setting": label,
            "pipeline": text,
            "removed": removed,
            "blocks": len(model.module.encoder.layer),
            "block_params": block_params,
            "onnx_bytes": nbytes,
            "weight_bytes": weights,
            "lee_pearson": lee_pearson(emb, ratings),
            "cosine_mean": float(cos.mean()),
            "cosine_min": float(cos.min()),
            "seconds": round(seconds, 1),
        }
        results.append(row)
        feeds = {k: encoded[0][k] for k in names}
        key = (row["blocks"], block_params)  # rows of the same depth and sharing run alike
        sessions.setdefault(key, lambda s=session, f=feeds: s.run(None, f))
        row["timed_as"] = list(sessions).index(key)
        print({k: v for k, v in row.items() if k != "pipeline"}, flush=True)
    ms = interleaved_medians(list(sessions.values()), trials=trials, paired=True)
    bw = bandwidth(kernels())  # bytes/s, measured in this run
    for row in results:
        t = ms[row["timed_as"]]
        row["ms"] = t
        row["floor_ms"] = row["weight_bytes"] / bw * 1e3
        row["sentences_per_s"] = 1e3 / t
        row["speedup"] = ms[0] / t
    return {
        "model": "all-MiniLM-L6-v2 (6 blocks)",
        "seq": seq,
        "calib_windows": n_calib,
        "cure_steps": cure_steps,
        "threads": THREADS,
        "trials": trials,
        "bandwidth_gbs": bw / 1e9,
        "rows": results,
    }


def read_once_bytes(model) -> int:
    """Bytes of the graph's initializers, each read once, leaving out tables only ever gathered
    from (the embeddings: a sentence reads a few of their rows)."""
    total = 0
    for v in model.graph.initializers.values():
        gathered = all(u.op_type == "Gather" and i == 0 for u, i in v.uses())
        if v.const_value is not None and not (gathered and v.uses()):
            total += v.const_value.nbytes
    return total


def markdown(data: dict, command: str) -> str:
    base = data["rows"][0]
    lines = [
        f"# FoldGPT on {data['model']}: block removal and sharing",
        "",
        f"`{command}`",
        "",
        f"Lee-pairs Pearson (50 documents, 1,225 human-rated pairs) and embedding cosine to fp32, "
        f"{data['seq']} tokens; calibration {data['calib_windows']} Wikipedia windows; cure "
        f"{data['cure_steps']} steps (`{CURE}`); sentences/s of the lowered ONNX model under "
        f"onnxruntime, batch 1, {data['threads']} threads, median of {data['trials']} interleaved "
        "runs in one process, one timing per distinct graph (depth, sharing), intra-op threads not "
        "spinning between calls. Bytes: the ONNX file (a shared weight stored once). Floor: the "
        f"graph's weights (not the embedding tables, only gathered from) read once at {data['bandwidth_gbs']:.1f} GB/s, the read bandwidth "
        "measured in the same run (at 128 tokens a sentence is compute-bound: the floor only "
        "says how far from memory-bound it is).",
        "",
        "| setting | removed | blocks | block params | ONNX MB | Lee Pearson | cos mean | "
        "cos min | ms | floor ms | sentences/s | vs fp32 | seconds |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in data["rows"]:
        lines.append(
            f"| {r['setting']} | {r['removed'] or '-'} | {r['blocks']} | "
            f"{r['block_params'] / 1e6:.2f}M | {r['onnx_bytes'] / 1e6:.1f} | "
            f"{r['lee_pearson']:.4f} | {r['cosine_mean']:.4f} | {r['cosine_min']:.4f} | "
            f"{r['ms']:.2f} | {r['floor_ms']:.2f} | {r['sentences_per_s']:.1f} | "
            f"{r['speedup']:.2f}x | {r['seconds']} |"
        )
    lines += [
        "",
        f"fp32 reference: Lee Pearson {base['lee_pearson']:.4f} at {data['seq']} tokens.",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--cure-steps", type=int, default=200)
    ap.add_argument("--trials", type=int, default=61)
    ap.add_argument("--rows", help="only these settings (;-separated), fp32 always first")
    ap.add_argument("--out", default="tools/quality/results/minilm_fold")
    args = ap.parse_args()
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    only = args.rows.split(";") if args.rows else None
    data = run(args.seq, args.calib, args.cure_steps, args.trials, only)
    command = (
        f"python -m tools.quality.minilm_fold --seq {args.seq} --calib {args.calib} "
        f"--cure-steps {args.cure_steps} --trials {args.trials}"
        + (f' --rows "{args.rows}" --out {args.out}' if args.rows else "")
    )
    save(args.out, data, markdown(data, command))


if __name__ == "__main__":
    main()
