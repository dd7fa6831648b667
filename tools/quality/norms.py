"""Quality of the DITN deployment passes: LayerNorm modes and W8A8, on the SR model and MiniLM.

    python -m tools.quality.norms [--tanh-steps 300] [--out tools/quality/results/norm_modes]

SR (the trained DITN-style x2 model, ``effc.models.ditn.load_trained``): PSNR on 128 x 128 LR
crops of the held-out images (chelsea and rocket, left and right crops), against fp32; the
calibration crops come from a training image (coffee), never from the evaluation images.
MiniLM (all-MiniLM-L6-v2, legacy export opset 14, 256 tokens): mean-pooled, L2-normalised
embeddings of gensim's 50 Lee documents; the cosine of each embedding to the fp32 one, and the
Pearson correlation of pairwise cosines with the 1,225 human ratings (fp32: 0.656 in DATA.md);
calibration from 16 windows of the Wikipedia calibration articles. Each row is one pipeline on
a fresh copy of the model; ``tanh`` trains on the torch model (FX) and is then lowered.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

THREADS = int(os.environ.get("EFFC_THREADS", "2"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from tools.results import save  # noqa: E402

EXACT = "fixpoint(cleanup,fuse),layernorm,fixpoint(cleanup,fuse)"
ROWS = {
    "fp32 (unmodified export)": "",
    "exact LayerNorm forms + fusion": EXACT,
    "LayerNorm -> calibrated affine (folded)": "fixpoint(cleanup,fuse),layernorm{mode=affine},"
    "fixpoint(cleanup,fuse)",
    "LayerNorm -> RMSNorm where mean ratio <= 0.1": "fixpoint(cleanup,fuse),layernorm{mode=rms},"
    "fixpoint(cleanup,fuse)",
    "LayerNorm -> RMSNorm everywhere": "fixpoint(cleanup,fuse),"
    "layernorm{mode=rms,max_mean_ratio=1},fixpoint(cleanup,fuse)",
    "LayerNorm -> tanh + 1x1 (distilled)": "layernorm{mode=tanh,steps=STEPS},"
    "fixpoint(cleanup,fuse)",
    "W8A8 (entropy)": EXACT + ",quantize-activations{method=entropy}",
    "W8A8 (percentile 99.99)": EXACT + ",quantize-activations{method=percentile}",
    "W8A8 (minmax)": EXACT + ",quantize-activations{method=minmax}",
}


def sr_data(size: int = 128):
    from tools.quality.sr import downscale, eval_pairs, load_image

    crops = []
    for lr, hr in eval_pairs(2).values():
        w = lr.shape[-1]
        for x0 in (0, w - size):
            crops.append(
                (lr[..., :size, x0 : x0 + size], hr[..., : 2 * size, 2 * x0 : 2 * (x0 + size)])
            )
    train = downscale(load_image("coffee")[None], 2)
    calib = [
        {"x": train[..., y : y + size, x : x + size].numpy()}
        for y, x in ((0, 0), (0, 150), (70, 0), (70, 150))
    ]
    return crops, calib


def _replaced(result) -> str:
    """What the layernorm pass did in a pipeline result: 'N/M' LayerNorms substituted (or, for
    exact, fused from decomposed chains + rewritten channel forms), or '-'."""
    for r in result.report.records if result is not None else []:
        if r.name == "layernorm":
            s = r.stats
            if "replaced" in s:
                return f"{s['replaced']}/{s['sites']}"
            return f"{s['decomposed_fused']} fused, {s.get('channel_rewritten', 0)} NCHW / {s['sites']}"
    return "-"


def _run(text: str, start, calib, steps: int):
    import effc

    if not text:
        return start, None
    result = effc.Pipeline.from_text(text.replace("STEPS", str(steps))).run(
        start, effc.PassContext(calibration=calib)
    )
    return result.model, result


def sr_rows(steps: int) -> list[dict]:
    from effc.ir import FxModel, OnnxModel
    from effc.ir.torch_io import export_onnx
    from effc.models.ditn import load_trained
    from tools.quality.sr import psnr

    crops, calib = sr_data()
    x = {"x": torch.from_numpy(calib[0]["x"])}
    rows, base = [], None
    for name, text in ROWS.items():
        model = load_trained()
        start = FxModel(model, x) if "tanh" in text else OnnxModel(export_onnx(model, x))
        t0 = time.perf_counter()
        ir_model, result = _run(text, start, calib, steps)
        seconds = time.perf_counter() - t0
        values = [
            psnr(torch.from_numpy(ir_model.run({"x": lr.numpy()})[0]), hr, 2) for lr, hr in crops
        ]
        value = float(np.mean(values))
        base = value if base is None else base
        rows.append(
            {
                "setting": name,
                "psnr": value,
                "delta": value - base,
                "norms": _replaced(result),
                "seconds": seconds,
            }
        )
        print(f"SR     {name:<48} PSNR {value:.3f} ({value - base:+.3f})", flush=True)
    return rows


def lee() -> tuple[list[str], np.ndarray]:
    import importlib.util

    folder = Path(importlib.util.find_spec("gensim").submodule_search_locations[0])
    data = folder / "test" / "test_data"
    docs = (data / "lee.cor").read_text(encoding="latin-1").strip().splitlines()
    ratings = np.loadtxt(data / "similarities0-1.txt")
    return docs, ratings


def pooled(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A sentence embedding: the (seq, hidden) states mean-pooled over the real tokens of
    ``mask`` (seq,), L2-normalised."""
    m = mask[:, None].astype(np.float32)
    e = (hidden * m).sum(0) / m.sum()
    return e / np.linalg.norm(e)


def embed(model, encoded: list[dict]) -> np.ndarray:
    return np.stack([pooled(model.run(f)[0][0], f["attention_mask"][0]) for f in encoded])


def lee_inputs(tokenizer, seq: int, n_calib: int) -> tuple[list[dict], np.ndarray, list[dict]]:
    """The Lee documents tokenized to ``seq`` tokens (padded), their human ratings, and
    ``n_calib`` calibration windows of ``seq`` tokens of the Wikipedia calibration articles."""
    from tools.quality.data import split, windows

    docs, ratings = lee()
    encoded = []
    for d in docs:
        t = tokenizer(d, max_length=seq, padding="max_length", truncation=True, return_tensors="np")
        encoded.append({k: t[k].astype(np.int64) for k in ("input_ids", "attention_mask")})
    calib = [
        {"input_ids": w[None].numpy(), "attention_mask": np.ones((1, seq), np.int64)}
        for w in windows(tokenizer, split()[0], n_calib, seq)
    ]
    return encoded, ratings, calib


def lee_pearson(emb: np.ndarray, ratings: np.ndarray) -> float:
    """Pearson correlation of the embeddings' pairwise cosines with the human ratings."""
    iu = np.triu_indices(len(emb), 1)
    return float(np.corrcoef((emb @ emb.T)[iu], ratings[iu])[0, 1])


def minilm_rows(steps: int, seq: int = 256) -> list[dict]:
    from transformers import AutoTokenizer

    from effc.ir import FxModel, OnnxModel
    from effc.ir.torch_io import export_onnx, load_hf_folder
    from effc.models.real import minilm_folder

    folder = minilm_folder()
    encoded, ratings, calib = lee_inputs(AutoTokenizer.from_pretrained(folder), seq, 16)
    rows, base = [], None
    for name, text in ROWS.items():
        module, inputs = load_hf_folder(folder, seq=seq)
        start = (
            FxModel(module, inputs)
            if "tanh" in text
            else OnnxModel(export_onnx(module, inputs, legacy=True, opset=14))
        )
        t0 = time.perf_counter()
        ir_model, result = _run(text, start, calib, steps)
        seconds = time.perf_counter() - t0
        emb = embed(ir_model, encoded)
        base = emb if base is None else base
        cos = (emb * base).sum(1)
        pearson = lee_pearson(emb, ratings)
        rows.append(
            {
                "setting": name,
                "cosine_mean": float(cos.mean()),
                "cosine_min": float(cos.min()),
                "lee_pearson": pearson,
                "norms": _replaced(result),
                "seconds": seconds,
            }
        )
        print(
            f"MiniLM {name:<48} cos {cos.mean():.5f} (min {cos.min():.5f}) Lee {pearson:.4f}",
            flush=True,
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tanh-steps", type=int, default=300)
    parser.add_argument("--out", default="tools/quality/results/norm_modes")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    sr = sr_rows(args.tanh_steps)
    lm = minilm_rows(args.tanh_steps)
    meta = {
        "command": f"python -m tools.quality.norms --tanh-steps {args.tanh_steps}",
        "threads": THREADS,
    }
    save(args.out, {"meta": meta, "sr": sr, "minilm": lm}, to_markdown(meta, sr, lm))


def to_markdown(meta: dict, sr: list[dict], lm: list[dict]) -> str:
    lines = [
        "# LayerNorm modes and W8A8: SR PSNR and MiniLM embedding quality",
        "",
        f"Command: `{meta['command']}`  ",
        "SR: trained DITN-style x2 model, mean PSNR over 4 LR crops of 128 x 128 from the "
        "held-out images (chelsea, rocket); calibration: 4 crops of a training image. MiniLM: "
        "legacy export (opset 14), 256 tokens, the 50 Lee documents; cosine of each embedding to "
        "the fp32 one; Pearson of pairwise cosines with the human ratings; calibration: 16 "
        "Wikipedia windows. norms: LayerNorms the layernorm pass substituted / found (exact: fused "
        "from decomposed chains, rewritten channel-first).",
        "",
        "| setting | SR PSNR dB | change | SR norms | MiniLM cosine to fp32 (mean / min) | Lee Pearson | MiniLM norms |",
        "|---|---:|---:|---|---|---:|---|",
    ]
    for s, m in zip(sr, lm):
        lines.append(
            f"| {s['setting']} | {s['psnr']:.3f} | {s['delta']:+.3f} | {s['norms']} | "
            f"{m['cosine_mean']:.5f} / {m['cosine_min']:.5f} | {m['lee_pearson']:.4f} | "
            f"{m['norms']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
