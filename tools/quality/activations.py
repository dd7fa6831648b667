"""What the BSR runtime's opt-in int8-activation mode costs in quality, on SmolLM2-135M.

    python -m tools.quality.activations [--windows 16 --seqlen 512] [--passes TEXT]

The model is compressed once (``--passes``, default W4 g16 RTN: a model whose perplexity is
close to fp32, so the activation error is not hidden under the weight error), every quantized
linear (lm_head included) is swapped for ``BSRLinear``, and perplexity is measured three ways on
the same evaluation windows: the fake-quantized fp32 model (the reference), the BSR kernels with
fp32 activations (must equal it to fp32 tolerance) and with int8 activations (x quantized to
int8 per block of the group, integer dot products). Every window is one forward of ``--seqlen``
tokens, so each linear runs at M = seqlen: the prefill regime where int8 activations are used.
"""

from __future__ import annotations

import argparse
import copy
import os
import time

THREADS = int(os.environ.get("EFFC_THREADS", "2"))
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from tools.results import save  # noqa: E402

DEFAULT = "quantize{bits=4,group=16}"


def measure(passes: str, n_windows: int, seqlen: int, calib_samples: int = 16) -> dict:
    import effc
    from effc.ir import FxModel
    from effc.models.real import smollm2_folder
    from effc.runtime.modules import swap_linears
    from tools.quality.data import split, windows
    from tools.quality.perplexity import load_model, perplexity

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    folder = smollm2_folder()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    calib_text, eval_text = split()
    eval_windows = windows(tokenizer, eval_text, n_windows, seqlen)
    calib = windows(tokenizer, calib_text, calib_samples, seqlen)
    model = load_model(folder)
    ctx = effc.PassContext(calibration=[{"input_ids": w[None].numpy()} for w in calib])
    result = effc.Pipeline.from_text(passes).run(FxModel(model, {"input_ids": calib[:1, :64]}), ctx)
    compression = result.model.compression
    rows = {"fake-quantized fp32 (reference)": model}
    for mode in ("fp32", "int8"):
        bsr = copy.deepcopy(model)
        swap_linears(bsr, compression, decide=False, activations=mode)
        rows[f"BSR kernels, {mode} activations"] = bsr
    out = {"passes": passes, "windows": n_windows, "seqlen": seqlen, "threads": THREADS, "rows": []}
    for name, m in rows.items():
        t0 = time.perf_counter()
        ppl = perplexity(m, eval_windows)
        out["rows"].append(
            {"setting": name, "perplexity": ppl, "seconds": time.perf_counter() - t0}
        )
        print(f"{name:<40} {ppl:9.3f}  ({out['rows'][-1]['seconds']:.1f} s)", flush=True)
    return out


def to_markdown(result: dict, command: str) -> str:
    base = result["rows"][0]["perplexity"]
    lines = [
        "# BSR runtime: int8 activations against fp32 activations (SmolLM2-135M)",
        "",
        f"Command: `{command}`  ",
        f"Pipeline: `{result['passes']}`. Evaluation: first {result['windows']} windows of "
        f"{result['seqlen']} tokens of the evaluation articles (M = {result['seqlen']} per "
        f"linear). Threads: {result['threads']}.",
        "",
        "| setting | perplexity | vs reference |",
        "|---|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['setting']} | {r['perplexity']:.3f} | {r['perplexity'] / base:.4f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--passes", default=DEFAULT)
    parser.add_argument("--out", default="tools/quality/results/int8_activations")
    args = parser.parse_args()
    result = measure(args.passes, args.windows, args.seqlen)
    command = f"python -m tools.quality.activations --windows {args.windows} --seqlen {args.seqlen}"
    if args.passes != DEFAULT:
        command += f" --passes '{args.passes}'"
    save(args.out, result, to_markdown(result, command))


if __name__ == "__main__":
    main()
