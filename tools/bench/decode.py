"""End-to-end greedy decoding of SmolLM2-135M: dense fp32 against GQSA-compressed BSR weights.

    python -m tools.bench.decode [--new-tokens 64] [--prompt-tokens 32] [--rounds 3]
                                 [--pipeline TEXT | --fold]
                                 [--out tools/bench/results/decode_smollm2]

``--fold`` runs FoldGPT's depth recipes instead of the GQSA settings (6 of 30 blocks removed by
cosine score; the rest shared in pairs; each with and without W4 g16), into
``decode_smollm2_fold``; a recipe without quantization decodes its fp32 weights.

One process, 2 threads (torch and OpenMP). The same prompt (the start of the evaluation text) is
decoded greedily by:
- effc's own decode loop (``effc.runtime.decode``: static KV cache, fused q/k/v and gate/up,
  compiled norm/attention/SiLU ops) on the fp32 model and, for each compressed setting (W4S50 and
  plain W4 g16 by default), on its dequantized dense weights and on the same model with every
  quantized linear swapped for ``BSRLinear`` (lm_head included);
- the same loop in torch ops (``fused=False``) on the fp32 model and the BSR models, to show what
  the fused loop gains on each;
- HF ``generate()`` (its default dynamic cache) on the fp32 model and on the BSR models.
Configurations alternate for ``--rounds`` rounds; each figure is the median round. The floor of a
token is the bytes its linear layers read divided by the read bandwidth measured in the same run.
The BSR tokens must equal the dequantized dense model's tokens (both fp32 math on the same
weights); the report says whether they do.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

THREADS = int(os.environ.get("EFFC_THREADS", "2"))
os.environ["OMP_NUM_THREADS"] = str(THREADS)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from tools.results import save  # noqa: E402

DEFAULT_PIPELINES = {
    "W4S50": "group-prune{sparsity=0.5},quantize{bits=4,group=16}",
    "W4": "quantize{bits=4,group=16}",
}


# FoldGPT's depth recipes (issue 27): 6 of 30 blocks removed by cosine score, the 24 left shared
# in pairs, then W4 g16 on top
FOLD_PIPELINES = {
    "remove 6": "remove-blocks{count=6,samples=16}",
    "remove 6 + share pairs": "remove-blocks{count=6,samples=16},share-blocks{group=2}",
    "remove 6 + share pairs + W4": "remove-blocks{count=6,samples=16},share-blocks{group=2},"
    "quantize{bits=4,group=16}",
    "remove 6 + W4": "remove-blocks{count=6,samples=16},quantize{bits=4,group=16}",
}


def pipelines(text: str | None, fold: bool = False) -> dict[str, str]:
    """The compressed settings to run: the defaults (or FoldGPT's with ``fold``), or one given on
    the command line."""
    if text:
        return {"custom": text}
    return dict(FOLD_PIPELINES if fold else DEFAULT_PIPELINES)


def _linear_tensors(model):
    """(name, tensors) of every linear layer by the name it is called under: a layer of a shared
    weight appears once per block that calls it."""
    from effc.runtime.modules import BSRLinear

    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, BSRLinear):
            yield name, list(module.matrix.tensors().values())
        elif isinstance(module, torch.nn.Linear):
            yield name, [module.weight]


def linear_bytes(model) -> int:
    """Bytes the linear layers of ``model`` read per token (dense fp32 weights or BSR buffers; a
    shared weight once per block that reads it)."""
    return sum(t.numel() * t.element_size() for _, ts in _linear_tensors(model) for t in ts)


def resident_bytes(model) -> int:
    """Bytes the linear layers' weights take in memory (a shared weight once)."""
    seen = {id(t): t for _, ts in _linear_tensors(model) for t in ts}
    return sum(t.numel() * t.element_size() for t in seen.values())


def hf_generate(model, prompt: torch.Tensor, new_tokens: int) -> tuple[list[int], float]:
    """Tokens and decode tokens/s of HF ``generate()`` (prefill timed separately and removed)."""
    ids = prompt[None]
    with torch.no_grad():
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, do_sample=False, min_new_tokens=1)
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.generate(
            ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
        )
        total = time.perf_counter() - t0
    return out[0, prompt.numel() :].tolist(), (new_tokens - 1) / max(total - prefill, 1e-9)


def main() -> None:
    import effc
    from effc.ir import FxModel
    from effc.models.real import smollm2_folder
    from effc.runtime.cpu import kernels
    from effc.runtime.decode import StaticDecoder
    from effc.runtime.modules import swap_linears
    from tools.bench.bsr_linear import bandwidth, cpu_description
    from tools.quality.data import split, windows

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calib-samples", type=int, default=8)
    parser.add_argument("--pipeline", help="one effc pipeline instead of the defaults")
    parser.add_argument(
        "--fold",
        action="store_true",
        help="FoldGPT's recipes (removal, sharing, with W4) instead of the GQSA defaults",
    )
    parser.add_argument("--no-hf", action="store_true", help="skip the HF generate() rows")
    parser.add_argument("--out")
    args = parser.parse_args()
    default_out = "tools/bench/results/decode_smollm2" + ("_fold" if args.fold else "")
    args.out = args.out or default_out
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    calib_text, eval_text = split()
    prompt = windows(tokenizer, eval_text, 1, args.prompt_tokens)[0]
    calibration = [
        {"input_ids": w[None].numpy()}
        for w in windows(tokenizer, calib_text, args.calib_samples, 256)
    ]

    def load():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    fp32 = load()
    bw = bandwidth(kernels())
    configs = {"fp32 (dense)": fp32}
    compress_info = {}
    for label, text in pipelines(args.pipeline, args.fold).items():
        compressed = load()
        compressed.config.use_cache = False
        t0 = time.perf_counter()
        ids = torch.from_numpy(calibration[0]["input_ids"][:, :64])
        result = effc.Pipeline.from_text(text).run(
            FxModel(compressed, {"input_ids": ids}), effc.PassContext(calibration=calibration)
        )
        compressed.config.use_cache = True
        if not result.model.compression.quantized():  # removal / sharing alone: fp32 weights
            compress_info[label] = {"pipeline": text, "compress_s": time.perf_counter() - t0}
            configs[f"{label} (fp32)"] = compressed
            continue
        bsr = copy.deepcopy(compressed)
        choices = swap_linears(bsr, result.model.compression, batch=1)
        compress_info[label] = {
            "pipeline": text,
            "compress_s": time.perf_counter() - t0,
            "sparse_layers": f"{sum(r['choice'] == 'sparse' for r in choices)} of {len(choices)}",
            "dense_fallback": [r["layer"] for r in choices if r["choice"] != "sparse"],
        }
        configs[f"{label} dequantized dense (fp32 math)"] = compressed
        configs[f"{label} BSR (effc kernels)"] = bsr
        bsr8 = copy.deepcopy(compressed)  # the opt-in int8-activation mode (lossy in x)
        swap_linears(bsr8, result.model.compression, batch=1, activations="int8")
        configs[f"{label} BSR int8 x (effc kernels)"] = bsr8

    max_len = args.prompt_tokens + args.new_tokens
    hf_names = [n for n in configs if n.endswith(("(dense)", "(fp32)", "BSR (effc kernels)"))]
    unfused = list(hf_names)
    rounds: dict[str, list] = {name: [] for name in configs}
    tokens: dict[str, list[int]] = {}
    torch_rounds: dict[str, list] = {name: [] for name in unfused}
    torch_tokens: dict[str, list[int]] = {}
    hf_rounds: dict[str, list] = {name: [] for name in hf_names}
    hf_tokens: dict[str, list[int]] = {}
    for _ in range(args.rounds):
        for name, model in configs.items():
            res = StaticDecoder(model, max_len).generate(prompt, args.new_tokens)
            rounds[name].append(res.tokens_per_s)
            tokens[name] = res.tokens
        for name in unfused:
            res = StaticDecoder(configs[name], max_len, fused=False).generate(
                prompt, args.new_tokens
            )
            torch_rounds[name].append(res.tokens_per_s)
            torch_tokens[name] = res.tokens
        if not args.no_hf:
            for name in hf_names:
                toks, rate = hf_generate(configs[name], prompt, args.new_tokens)
                hf_rounds[name].append(rate)
                hf_tokens[name] = toks

    def row(loop: str, name: str, rate: float, base: float) -> dict:
        nbytes = linear_bytes(configs[name])
        floor_ms = nbytes / bw * 1e3
        return {
            "loop": loop,
            "config": name,
            "tokens_per_s": rate,
            "ms_per_token": 1e3 / rate,
            "linear_MB": nbytes / 1e6,
            "resident_MB": resident_bytes(configs[name]) / 1e6,
            "floor_ms": floor_ms,
            "x_floor": (1e3 / rate) / floor_ms,
            "speedup_vs_fp32": rate / base,
        }

    base = statistics.median(rounds["fp32 (dense)"])
    rows = [row("effc static cache", n, statistics.median(r), base) for n, r in rounds.items()]
    torch_base = statistics.median(torch_rounds["fp32 (dense)"])
    rows += [
        row("effc static cache, torch ops", n, statistics.median(r), torch_base)
        for n, r in torch_rounds.items()
    ]
    if not args.no_hf:
        hf_base = statistics.median(hf_rounds["fp32 (dense)"])
        rows += [
            row("HF generate()", n, statistics.median(r), hf_base) for n, r in hf_rounds.items()
        ]
    checks = {}
    for label in compress_info:
        if f"{label} BSR (effc kernels)" not in tokens:
            continue
        ref, got = (
            tokens[f"{label} dequantized dense (fp32 math)"],
            tokens[f"{label} BSR (effc kernels)"],
        )
        checks[f"{label}: BSR tokens == dequantized tokens"] = got == ref
        if f"{label} BSR int8 x (effc kernels)" in tokens:  # lossy: how long it agrees
            got8 = tokens[f"{label} BSR int8 x (effc kernels)"]
            same = next((i for i, (a, b) in enumerate(zip(got8, ref)) if a != b), len(ref))
            checks[f"{label}: BSR int8 x tokens agree with dequantized for the first"] = (
                f"{same} of {len(ref)}"
            )
        if not args.no_hf:
            checks[f"{label}: HF generate() tokens == effc loop tokens"] = (
                hf_tokens[f"{label} BSR (effc kernels)"] == got
            )
    for name in unfused:
        checks[f"{name}: torch-op loop tokens == fused loop tokens"] = (
            torch_tokens[name] == tokens[name]
        )
    if not args.no_hf:
        checks["fp32: HF generate() tokens == effc loop tokens"] = (
            hf_tokens["fp32 (dense)"] == tokens["fp32 (dense)"]
        )
    meta = {
        "command": "python -m tools.bench.decode"
        + (f" --pipeline '{args.pipeline}'" if args.pipeline else "")
        + (" --fold" if args.fold else "")
        + (" --no-hf" if args.no_hf else "")
        + (f" --out {args.out}" if args.out != default_out else ""),
        "model": "SmolLM2-135M-Instruct (fp32 from the Q4_1 GGUF)",
        "compressed": compress_info,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "rounds": args.rounds,
        "threads": THREADS,
        "bandwidth_GBps": bw / 1e9,
        "cpu": cpu_description(kernels()),
        "torch": torch.__version__,
        "text": {
            name: tokenizer.decode(tokens[name]) for name in configs if "dequantized" not in name
        },
        "prompt": tokenizer.decode(prompt),
    }
    save(args.out, {"meta": meta, "checks": checks, "rows": rows}, to_markdown(meta, checks, rows))


def to_markdown(meta: dict, checks: dict, rows: list[dict]) -> str:
    lines = [
        "# SmolLM2-135M greedy decoding: fp32 vs "
        + ("FoldGPT's depth recipes" if "--fold" in meta["command"] else "GQSA BSR"),
        "",
        f"Command: `{meta['command']}`  ",
        f"Prompt {meta['prompt_tokens']} tokens, {meta['new_tokens']} new tokens, median of "
        f"{meta['rounds']} alternating rounds; threads {meta['threads']}; read bandwidth "
        f"{meta['bandwidth_GBps']:.1f} GB/s (same run); floor = linear-layer bytes per token / "
        "bandwidth (attention and the Python loop are not in it). Speedups are against fp32 in the "
        "same loop.  ",
        f"CPU: {meta.get('cpu', 'not recorded')}.",
        "",
    ]
    for label, info in meta["compressed"].items():
        line = f"- {label}: `{info['pipeline']}`, compressed in {info['compress_s']:.0f} s"
        if "sparse_layers" in info:
            line += f"; sparse kernel chosen for {info['sparse_layers']} layers"
        if info.get("dense_fallback"):
            line += f" (dense: {', '.join(info['dense_fallback'])})"
        lines.append(line)
    lines += [
        "",
        "Linear MB/token: the bytes the linear layers read per token (a shared weight once per "
        "block that reads it); resident MB: what they take in memory (a shared weight once).",
        "",
        "| loop | model | tokens/s | ms/token | linear MB/token | resident MB | floor ms | x floor "
        "| speedup vs fp32 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        resident = r.get("resident_MB")
        lines.append(
            f"| {r['loop']} | {r['config']} | {r['tokens_per_s']:.1f} | {r['ms_per_token']:.2f} | "
            f"{r['linear_MB']:.1f} | {'' if resident is None else f'{resident:.1f}'} | "
            f"{r['floor_ms']:.2f} | {r['x_floor']:.2f} | {r['speedup_vs_fp32']:.2f}x |"
        )
    lines += ["", "Checks:", ""] + [f"- {k}: {v}" for k, v in checks.items()]
    lines += ["", f"Prompt: {meta['prompt']!r}", ""]
    lines += [f"- {name}: {text!r}" for name, text in meta["text"].items()]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
