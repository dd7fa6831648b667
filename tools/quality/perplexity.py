"""Perplexity of SmolLM2-135M under effc pipelines (GQSA one-shot settings and baselines).

    python -m tools.quality.perplexity [--windows 32 --seqlen 512 --calib-samples 32] [--rows NAME,...]

Evaluation: the first ``--windows`` windows of ``--seqlen`` tokens of the evaluation articles
(tools/quality/data.py: even/odd article split, never overlapping with calibration); the same
windows for every row. Calibration: ``--calib-samples`` windows of the calibration articles, or a
row's own count where ROWS gives one as ``(pipeline, windows)`` (the first windows are the same).
``--calib-order first`` (the default, every committed row) takes the calibration text's first
windows: 16 windows of 512 tokens all lie in its first article (Anarchism), as the first 16
evaluation windows lie in one article (Autism). ``--calib-order shuffled`` draws them in a seeded
random order from the whole calibration text (tools/quality/data.py ``windows``).
Rows land in ``--out`` (default tools/quality/results/smollm2_perplexity): an earlier run's rows with
the same settings are kept, a row run again replaces its own, and a table run with other settings
(another --windows, --calib-samples or --calib-order) is refused unless ``--replace``.
Bytes count the compressible linear layers only (the fp32 embedding is the same in every row):
BSR rows split values / indices / scales; dense quantized rows count codes + fp16 scale + uint8 zero.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

THREADS = int(os.environ.get("EFFC_THREADS", "2"))
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from tools.results import save  # noqa: E402

# The block-wise training budget every trained row gets (W4S50 and the 2:4 baselines alike):
# 128 Adam steps per transformer block over 16 calibration windows, lr 3e-3 cosine-annealed.
BQPO = "gqsa-train{stage=bqpo,steps=128,lr=0.003,samples=16}"
# The trained W4S50 rows' shared parts: one-shot OBS pruning with the sensitivity allocation plus
# GPTQ, and BQPO towards the original model's hidden states with lm_head trained last.
# Calibration windows whose perplexity each stage also reports: the ones the trained rows fit
# (samples=16); their gap to the evaluation windows is overfitting.
SEEN_WINDOWS = 16
DEFAULT_OUT = "tools/quality/results/smollm2_perplexity"
W4S50_ONESHOT = (
    "group-prune{sparsity=0.5,score=obs,allocate=sensitivity},quantize{bits=4,group=16,method=gptq}"
)
BQPO_MODEL_TAIL = f"{BQPO[:-1]},target=model,tail=true}}"
# One-shot with the lm_head's rows weighted by the tokens' predicted probability; BQPO's lm_head
# stage then trains on KL as well.
W4S50_LOGIT = (
    "group-prune{sparsity=0.5,score=obs,allocate=sensitivity,logit_weight=0.5},"
    "quantize{bits=4,group=16,method=gptq}"
)
# The same with lm_head held at the target sparsity (the allocation pushes it to 0.7, where it
# alone costs 171 perplexity one-shot against 72 at 0.5); the other layers prune a little more.
W4S50_PINNED = W4S50_ONESHOT.replace(
    "allocate=sensitivity", "allocate=sensitivity,pin=[lm_head:0.5]"
)
BQPO_MODEL_TAIL_KD = f"{BQPO_MODEL_TAIL[:-1]},tail_loss=kd}}"
# The same with each block pruned and quantized on the outputs of the compressed blocks before it
# (SparseGPT / GPTQ's sequential calibration).
W4S50_SEQUENTIAL = (
    "group-prune{sparsity=0.5,score=obs,allocate=sensitivity,sequential=true},"
    "quantize{bits=4,group=16,method=gptq,sequential=true}"
)

ROWS = {
    "fp32": "",
    "W4 g16 RTN": "quantize{bits=4,group=16}",
    "W4 g32 RTN": "quantize{bits=4,group=32}",
    "W4 g64 RTN": "quantize{bits=4,group=64}",
    "W4 g64 RTN sym": "quantize{bits=4,group=64,symmetric=true}",
    "W4 g16 GPTQ": "quantize{bits=4,group=16,method=gptq}",
    "W4 g32 GPTQ": "quantize{bits=4,group=32,method=gptq}",
    "W4 g64 GPTQ": "quantize{bits=4,group=64,method=gptq}",
    "W4 g16 RTN, embedding int8": "quantize{bits=4,group=16,embeddings=int8}",
    "W4 g16 RTN, embedding int4": "quantize{bits=4,group=16,embeddings=int4}",
    "W4 g16 RTN, embedding tied to lm_head": "quantize{bits=4,group=16,embeddings=tied}",
    "W4 g32 RTN, embedding tied to lm_head": "quantize{bits=4,group=32,embeddings=tied}",
    "W8 g16 RTN": "quantize{bits=8,group=16}",
    "remove 3 blocks (cosine)": "remove-blocks{count=3,samples=16}",
    "remove 6 blocks (cosine)": "remove-blocks{count=6,samples=16}",
    "remove 9 blocks (cosine)": "remove-blocks{count=9,samples=16}",
    "remove 12 blocks (cosine)": "remove-blocks{count=12,samples=16}",
    "remove 3 blocks (random)": "remove-blocks{count=3,score=random}",
    "remove 6 blocks (random)": "remove-blocks{count=6,score=random}",
    "remove 9 blocks (random)": "remove-blocks{count=9,score=random}",
    "remove 12 blocks (random)": "remove-blocks{count=12,score=random}",
    # greedy: each round skips every remaining block on 4 calibration windows, takes the closest
    "remove 3 blocks (greedy)": "remove-blocks{count=3,score=greedy,samples=4}",
    "remove 6 blocks (greedy)": "remove-blocks{count=6,score=greedy,samples=4}",
    "remove 9 blocks (greedy)": "remove-blocks{count=9,score=greedy,samples=4}",
    "remove 12 blocks (greedy)": "remove-blocks{count=12,score=greedy,samples=4}",
    "remove 6 blocks (greedy) + cure": "remove-blocks{count=6,score=greedy,samples=4},"
    "cure{steps=32,samples=16,lr=0.0001}",
    # scale gates: y = x + g * (block(x) - x), g in [0, 1], polarizing + budget terms
    "remove 6 blocks (gates, scale)": "block-gates{method=scale,steps=32,lr=0.05,samples=16,"
    "rate=0.2},remove-blocks{count=6,score=gates}",
    # sampled gates: every step draws 4 removals of K blocks from the gates, judged by their KL
    "remove 3 blocks (gates)": "block-gates{count=3,steps=150,samples=16,polish=0},"
    "remove-blocks{count=3,score=gates}",
    "remove 6 blocks (gates)": "block-gates{count=6,steps=150,samples=16,polish=0},"
    "remove-blocks{count=6,score=gates}",
    "remove 9 blocks (gates)": "block-gates{count=9,steps=150,samples=16,polish=0},"
    "remove-blocks{count=9,score=gates}",
    "remove 12 blocks (gates)": "block-gates{count=12,steps=150,samples=16,polish=0},"
    "remove-blocks{count=12,score=gates}",
    "remove 6 blocks (gates) + cure": "block-gates{count=6,steps=150,samples=16,polish=0},"
    "remove-blocks{count=6,score=gates},cure{steps=32,samples=16,lr=0.0001}",
    "remove 12 blocks (gates) + cure": "block-gates{count=12,steps=150,samples=16,polish=0},"
    "remove-blocks{count=12,score=gates},cure{steps=32,samples=16,lr=0.0001}",
    # the same gates, then two rounds of swap search at the boundary (block-gates' default)
    "remove 3 blocks (gates + polish)": "block-gates{count=3,steps=150,samples=16},"
    "remove-blocks{count=3,score=gates}",
    "remove 6 blocks (gates + polish)": "block-gates{count=6,steps=150,samples=16},"
    "remove-blocks{count=6,score=gates}",
    "remove 9 blocks (gates + polish)": "block-gates{count=9,steps=150,samples=16},"
    "remove-blocks{count=9,score=gates}",
    "remove 12 blocks (gates + polish)": "block-gates{count=12,steps=150,samples=16},"
    "remove-blocks{count=12,score=gates}",
    "remove 3 blocks (gates + polish) + cure": "block-gates{count=3,steps=150,samples=16},"
    "remove-blocks{count=3,score=gates},cure{steps=32,samples=16,lr=0.0001}",
    "remove 9 blocks (gates + polish) + cure": "block-gates{count=9,steps=150,samples=16},"
    "remove-blocks{count=9,score=gates},cure{steps=32,samples=16,lr=0.0001}",
    "remove 6 blocks (gates + polish) + cure 96 steps": "block-gates{count=6,steps=150,samples=16},"
    "remove-blocks{count=6,score=gates},cure{steps=96,samples=16,lr=0.0001}",
    "remove 3 blocks (cosine) + cure": "remove-blocks{count=3,samples=16},"
    "cure{steps=32,samples=16,lr=0.0001}",
    # the polished gates' best sets each cured 16 steps (256-token chunks) before choosing
    "remove 3 blocks (gates + polish + probe) + cure": "block-gates{count=3,steps=150,"
    "samples=16,probe=16},remove-blocks{count=3,score=gates},cure{steps=32,samples=16,lr=0.0001}",
    "remove 3 blocks (cosine) + cure 96 steps": "remove-blocks{count=3,samples=16},"
    "cure{steps=96,samples=16,lr=0.0001}",
    "remove 3 blocks (gates + polish) + cure 96 steps": "block-gates{count=3,steps=150,"
    "samples=16},remove-blocks{count=3,score=gates},cure{steps=96,samples=16,lr=0.0001}",
    "remove 9 blocks (cosine) + cure": "remove-blocks{count=9,samples=16},"
    "cure{steps=32,samples=16,lr=0.0001}",
    "remove 12 blocks (cosine) + cure": "remove-blocks{count=12,samples=16},"
    "cure{steps=32,samples=16,lr=0.0001}",
    "remove 6 blocks (cosine) + cure": "remove-blocks{count=6,samples=16},"
    "cure{steps=32,samples=16,lr=0.0001}",
    "remove 6 blocks (cosine) + cure 96 steps": "remove-blocks{count=6,samples=16},"
    "cure{steps=96,samples=16,lr=0.0001}",
    "remove 6 blocks (cosine) + share pairs": "remove-blocks{count=6,samples=16},share-blocks{group=2}",
    # the combined recipe against GQSA alone at about the same bytes: 27 blocks at W4 g32 take the
    # bytes of 30 at W4 g64 (73.5 MB); 24 cured blocks at W4 g16 about those of 30 at W4 g32
    "remove 6 blocks (cosine) + W4 g16 RTN": "remove-blocks{count=6,samples=16},"
    "quantize{bits=4,group=16}",
    "remove 3 blocks (cosine) + W4 g32 GPTQ": "remove-blocks{count=3,samples=16},"
    "quantize{bits=4,group=32,method=gptq}",
    "remove 6 blocks (cosine) + cure 96 steps + W4 g16 GPTQ": "remove-blocks{count=6,samples=16},"
    "cure{steps=96,samples=16,lr=0.0001},quantize{bits=4,group=16,method=gptq}",
    "remove 6 blocks (cosine) + share triples": "remove-blocks{count=6,samples=16},"
    "share-blocks{group=3}",
    "remove 6 blocks (cosine) + share pairs + cure": "remove-blocks{count=6,samples=16},"
    "share-blocks{group=2},cure{steps=32,samples=16,lr=0.0001}",
    # the shared weight as the group's mean, or fitted to every block's outputs on calibration text
    "remove 6 blocks (cosine) + share pairs (mean)": "remove-blocks{count=6,samples=16},"
    "share-blocks{group=2,choose=mean}",
    "remove 6 blocks (cosine) + share pairs (fit)": "remove-blocks{count=6,samples=16},"
    "share-blocks{group=2,choose=fit}",
    "remove 6 blocks (cosine) + share pairs (fit) + cure 96 steps": "remove-blocks{count=6,"
    "samples=16},share-blocks{group=2,choose=fit},cure{steps=96,samples=16,lr=0.0001}",
    "remove 6 blocks (cosine) + share pairs (fit, sequential)": "remove-blocks{count=6,"
    "samples=16},share-blocks{group=2,choose=fit,sequential=true}",
    "remove 6 blocks (cosine) + share pairs (fit, sequential) + cure 96 steps": "remove-blocks{"
    "count=6,samples=16},share-blocks{group=2,choose=fit,sequential=true},"
    "cure{steps=96,samples=16,lr=0.0001}",
    "W3 g64 RTN": "quantize{bits=3,group=64}",
    "W3 g64 GPTQ": "quantize{bits=3,group=64,method=gptq}",
    "W2 g64 RTN": "quantize{bits=2,group=64}",
    "W2 g64 GPTQ": "quantize{bits=2,group=64,method=gptq}",
    "S30 groups (wanda/row)": "group-prune{sparsity=0.3}",
    "S40 groups (wanda/row)": "group-prune{sparsity=0.4}",
    "S50 groups (wanda/row)": "group-prune{sparsity=0.5}",
    "S50 groups (magnitude/row)": "group-prune{sparsity=0.5,score=magnitude}",
    "S50 groups (wanda/layer)": "group-prune{sparsity=0.5,scope=layer}",
    "S50 groups (wanda/global)": "group-prune{sparsity=0.5,scope=global}",
    "S30 groups (obs/row)": "group-prune{sparsity=0.3,score=obs}",
    "S40 groups (obs/row)": "group-prune{sparsity=0.4,score=obs}",
    "S50 groups (obs/row)": "group-prune{sparsity=0.5,score=obs}",
    "S50 groups (obs/layer)": "group-prune{sparsity=0.5,score=obs,scope=layer}",
    "S50 groups (obs/row, sensitivity allocation)": "group-prune{sparsity=0.5,score=obs,allocate=sensitivity}",
    "W4S50 one-shot (obs + sensitivity + GPTQ g16)": "group-prune{sparsity=0.5,score=obs,allocate=sensitivity},"
    "quantize{bits=4,group=16,method=gptq}",
    "W4S50 one-shot (obs + GPTQ g16)": "group-prune{sparsity=0.5,score=obs},quantize{bits=4,group=16,method=gptq}",
    "W4S50 one-shot (wanda + RTN g16)": "group-prune{sparsity=0.5},quantize{bits=4,group=16}",
    "W4S50 one-shot (wanda + GPTQ g16)": "group-prune{sparsity=0.5},quantize{bits=4,group=16,method=gptq}",
    "W4S50 one-shot (wanda global + GPTQ g16)": "group-prune{sparsity=0.5,scope=global},"
    "quantize{bits=4,group=16,method=gptq}",
    "W4S50 (obs, sensitivity) + BQPO + E2E-OQP": f"{W4S50_ONESHOT},{BQPO},"
    "gqsa-train{stage=e2e,steps=32,lr=0.0001,samples=16}",
    "W4S50 (obs, sensitivity) + BQPO with lm_head + E2E-OQP": f"{W4S50_ONESHOT},{BQPO[:-1]},"
    "tail=true},gqsa-train{stage=e2e,steps=32,lr=0.0001,samples=16}",
    "W4S50 (obs, sensitivity) + BQPO to the model's states with lm_head + E2E-OQP (KD)": (
        f"{W4S50_ONESHOT},{BQPO_MODEL_TAIL},gqsa-train{{stage=e2e,steps=64,lr=0.0003,samples=16,loss=kd}}"
    ),
    "W4S50 (obs, sensitivity) + BQPO to the model's states with lm_head + E2E-OQP (KD, 128 steps)": (
        f"{W4S50_ONESHOT},{BQPO_MODEL_TAIL},"
        "gqsa-train{stage=e2e,steps=128,lr=0.0003,samples=16,loss=kd}"
    ),
    "W4S50 (obs, sensitivity) + BQPO to the model's states with lm_head + E2E-OQP (KD, 128 steps), "
    "128 calibration windows": (
        f"{W4S50_ONESHOT},{BQPO_MODEL_TAIL},"
        "gqsa-train{stage=e2e,steps=128,lr=0.0003,samples=128,loss=kd}",
        128,
    ),
    "W4S50 (obs, sensitivity) + BQPO on 128 windows to the model's states with lm_head + E2E-OQP "
    "(KD, 128 steps), 128 calibration windows": (
        f"{W4S50_ONESHOT},{BQPO_MODEL_TAIL.replace('samples=16', 'samples=128')},"
        "gqsa-train{stage=e2e,steps=128,lr=0.0003,samples=128,loss=kd}",
        128,
    ),
    "W4S50 (obs, sensitivity) + BQPO to the model's states with lm_head + E2E-OQP (KD, 128 steps, "
    "norms trained too), 128 calibration windows": (
        f"{W4S50_ONESHOT},{BQPO_MODEL_TAIL},"
        "gqsa-train{stage=e2e,steps=128,lr=0.0003,samples=128,loss=kd,norms=true}",
        128,
    ),
    "W4S50 rearranged (obs, sensitivity) + BQPO to the model's states with lm_head + E2E-OQP (KD, "
    "128 steps)": (
        f"rearrange{{group=16}},{W4S50_ONESHOT},{BQPO_MODEL_TAIL},"
        "gqsa-train{stage=e2e,steps=128,lr=0.0003,samples=16,loss=kd}"
    ),
    "W4S50 (obs, sensitivity) + BQPO to the model's states with lm_head + E2E-OQP (KD, 208 steps), "
    "208 calibration windows": (
        f"{W4S50_ONESHOT},{BQPO_MODEL_TAIL},"
        "gqsa-train{stage=e2e,steps=208,lr=0.0003,samples=208,loss=kd}",
        208,
    ),
    "W4S50 (obs, sensitivity, sequential) + BQPO to the model's states with lm_head + E2E-OQP (KD, "
    "128 steps), 128 calibration windows": (
        f"{W4S50_SEQUENTIAL},{BQPO_MODEL_TAIL},"
        "gqsa-train{stage=e2e,steps=128,lr=0.0003,samples=128,loss=kd}",
        128,
    ),
    "S50 groups (obs/row, KL sensitivity allocation, logit-weighted lm_head)": (
        "group-prune{sparsity=0.5,score=obs,allocate=sensitivity,metric=kl,logit_weight=0.5}"
    ),
    "S50 groups (obs/row, sensitivity allocation, logit-weighted lm_head)": (
        "group-prune{sparsity=0.5,score=obs,allocate=sensitivity,logit_weight=0.5}"
    ),
    "W4S50 (obs, sensitivity, logit-weighted lm_head) + BQPO to the model's states with lm_head "
    "on KL + E2E-OQP (KD, 128 steps)": (
        f"{W4S50_LOGIT},{BQPO_MODEL_TAIL_KD},"
        "gqsa-train{stage=e2e,steps=128,lr=0.0003,samples=16,loss=kd}"
    ),
    "W4S50 (obs, sensitivity, logit-weighted lm_head) + BQPO at lr 1e-3 to the model's states with "
    "lm_head on KL + E2E-OQP (KD, 128 steps)": (
        f"{W4S50_LOGIT},{BQPO_MODEL_TAIL_KD.replace('lr=0.003', 'lr=0.001')},"
        "gqsa-train{stage=e2e,steps=128,lr=0.0003,samples=16,loss=kd}"
    ),
    "W4S50 (obs, sensitivity, logit-weighted lm_head) + BQPO to the model's states with lm_head "
    "on KL + E2E-OQP (KD, 208 steps), 208 calibration windows": (
        f"{W4S50_LOGIT},{BQPO_MODEL_TAIL_KD},"
        "gqsa-train{stage=e2e,steps=208,lr=0.0003,samples=208,loss=kd}",
        208,
    ),
    "W4S50 (obs, sensitivity, lm_head pinned at 50%) + BQPO to the model's states with lm_head "
    "+ E2E-OQP (KD, 208 steps), 208 calibration windows": (
        f"{W4S50_PINNED},{BQPO_MODEL_TAIL},"
        "gqsa-train{stage=e2e,steps=208,lr=0.0003,samples=208,loss=kd}",
        208,
    ),
    "W4S50 (obs, sensitivity, lm_head pinned at 50%) + BQPO on 128 windows to the model's states "
    "with lm_head + E2E-OQP (KD, 208 steps), 208 calibration windows": (
        f"{W4S50_PINNED},{BQPO_MODEL_TAIL.replace('samples=16', 'samples=128')},"
        "gqsa-train{stage=e2e,steps=208,lr=0.0003,samples=208,loss=kd}",
        208,
    ),
    # The same recipe at lower sparsity: the W4 + groups points of the Pareto front.
    "W4S20 (obs, sensitivity) + BQPO to the model's states with lm_head + E2E-OQP (KD, 128 steps)": (
        f"{W4S50_ONESHOT.replace('sparsity=0.5', 'sparsity=0.2')},{BQPO_MODEL_TAIL},"
        "gqsa-train{stage=e2e,steps=128,lr=0.0003,samples=16,loss=kd}"
    ),
    "W4S30 (obs, sensitivity) + BQPO to the model's states with lm_head + E2E-OQP (KD, 128 steps)": (
        f"{W4S50_ONESHOT.replace('sparsity=0.5', 'sparsity=0.3')},{BQPO_MODEL_TAIL},"
        "gqsa-train{stage=e2e,steps=128,lr=0.0003,samples=16,loss=kd}"
    ),
    "W4S40 (obs, sensitivity) + BQPO to the model's states with lm_head + E2E-OQP (KD, 128 steps)": (
        f"{W4S50_ONESHOT.replace('sparsity=0.5', 'sparsity=0.4')},{BQPO_MODEL_TAIL},"
        "gqsa-train{stage=e2e,steps=128,lr=0.0003,samples=16,loss=kd}"
    ),
    "2:4 magnitude": "nm-prune{n=2,m=4,score=magnitude}",
    "2:4 obs (SparseGPT)": "nm-prune{n=2,m=4,score=obs}",
    "2:4 wanda": "nm-prune{n=2,m=4,score=wanda}",
    "2:4 magnitude + BQPO": f"nm-prune{{n=2,m=4,score=magnitude}},{BQPO}",
    "2:4 wanda + BQPO": f"nm-prune{{n=2,m=4,score=wanda}},{BQPO}",
    "2:4 obs (SparseGPT) + BQPO": f"nm-prune{{n=2,m=4,score=obs}},{BQPO}",
    "2:4 obs (SparseGPT) + BQPO, 128 calibration windows": (
        f"nm-prune{{n=2,m=4,score=obs}},{BQPO}",
        128,
    ),
    "2:4 obs (SparseGPT, sequential) + BQPO, 128 calibration windows": (
        f"nm-prune{{n=2,m=4,score=obs,sequential=true}},{BQPO}",
        128,
    ),
    "S50 groups (obs/row, sequential)": "group-prune{sparsity=0.5,score=obs,sequential=true}",
}


def row_spec(name: str, default_windows: int) -> tuple[str, int]:
    """(pipeline, calibration windows) of a row."""
    spec = ROWS[name]
    return spec if isinstance(spec, tuple) else (spec, default_windows)


class StagePerplexity:
    """Pipeline instrument: perplexity after every lossy pass, so one row shows each stage's gain
    (one-shot, + BQPO, + E2E-OQP) with the seconds each pass took."""

    wants_error = False

    def __init__(self, model, windows: torch.Tensor, seen: torch.Tensor | None = None):
        self.model, self.windows, self.seen, self.rows = model, windows, seen, []

    def before_pass(self, text, ctx) -> None:
        pass

    def after_pass(self, record, model, ctx, index) -> None:
        if record.name in ("group-prune", "nm-prune", "quantize", "gqsa-train"):
            self.rows.append(
                {
                    "after": record.text,
                    "perplexity": perplexity(self.model, self.windows),
                    "seconds": round(record.seconds, 1),
                    **(
                        {"calib_perplexity": perplexity(self.model, self.seen)}
                        if self.seen is not None
                        else {}
                    ),
                }
            )


def load_model(folder: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model.config.use_cache = False
    return model


@torch.no_grad()
def perplexity(model, windows: torch.Tensor) -> float:
    nll, count = 0.0, 0
    for ids in windows:
        logits = model(input_ids=ids[None]).logits[0, :-1]
        nll += float(torch.nn.functional.cross_entropy(logits, ids[1:], reduction="sum"))
        count += ids.numel() - 1
    return math.exp(nll / count)


def compressed_bytes(model, compression) -> dict:
    """values / indices / scales bytes of the compressible linear layers."""
    from effc.runtime.modules import matrix_from_state

    totals = {"values": 0, "indices": 0, "scales": 0}
    seen: set[int] = set()  # a weight shared by several blocks (share-blocks) is stored once
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or id(module.weight) in seen:
            continue
        seen.add(id(module.weight))
        state = compression.get(name)
        out, inp = module.weight.shape
        if (
            state is not None
            and state.quantized
            and state.bits in (4, 8)
            and state.mask is not None
        ):
            for k, v in matrix_from_state(state).nbytes().items():
                totals[k] += v
        elif state is not None and state.quantized:
            totals["values"] += out * inp * state.bits // 8
            totals["scales"] += (out * inp // state.group) * 3
        elif state is not None and state.mask is not None:  # pruned only: fp32 values + indices
            kept = int(state.mask.sum())
            totals["values"] += kept * state.group * 4
            totals["indices"] += kept * 2 + (out + 1) * 4
        else:
            totals["values"] += out * inp * 4
    return totals


def main() -> None:
    import effc
    from effc.ir import FxModel
    from effc.ir.compression import CompressionState
    from effc.models.real import smollm2_folder
    from tools.quality.data import ORDERS, SPLIT, split, windows

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument(
        "--calib-order",
        choices=ORDERS,
        default="first",
        help="first: the calibration text's first windows (one or two articles); shuffled: "
        "windows drawn in a seeded random order from the whole calibration text",
    )
    parser.add_argument("--rows", help="row names separated by ';' (default: all)")
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument(
        "--replace",
        action="store_true",
        help="start --out anew when it holds rows run with other settings (refused otherwise)",
    )
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)

    folder = smollm2_folder()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    calib_text, eval_text = split()
    eval_windows = windows(tokenizer, eval_text, args.windows, args.seqlen)
    names = args.rows.split(";") if args.rows else list(ROWS)
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; rows: {'; '.join(ROWS)}")
    most = max(row_spec(n, args.calib_samples)[1] for n in names)
    calib_windows = windows(tokenizer, calib_text, most, args.seqlen, order=args.calib_order)
    calibration = [{"input_ids": w[None].numpy()} for w in calib_windows]
    meta = {
        "model": "SmolLM2-135M-Instruct (dequantized Q4_1 GGUF, fp32)",
        "eval": f"first {args.windows} windows of {args.seqlen} tokens of the evaluation articles",
        "calibration": f"{args.calib_samples} windows of {args.seqlen} tokens of the calibration articles"
        + (
            ""
            if args.calib_order == "first"
            else ", drawn in a seeded random order (torch.randperm, seed 0) from all the calibration text's windows"
        ),
        "split": SPLIT,
        "threads": THREADS,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save_all() -> None:  # after every row, so a long run loses nothing
        save(out, {"meta": meta, "rows": results}, to_markdown(meta, results, args), echo=False)

    try:
        results = kept_rows(out.with_suffix(".json"), meta, args.calib_samples, args.replace)
    except ValueError as e:
        parser.error(str(e))
    for name in names:
        model = load_model(folder)
        t0 = time.perf_counter()
        compression = CompressionState()
        stages = None
        text, count = row_spec(name, args.calib_samples)
        if text:
            ctx = effc.PassContext(calibration=calibration[:count], error_samples=2)
            fx_inputs = {"input_ids": calib_windows[:1, :64]}
            fxm = FxModel(model, fx_inputs)
            stages = StagePerplexity(model, eval_windows, calib_windows[: min(count, SEEN_WINDOWS)])
            pipeline = effc.Pipeline.from_text(text)
            pipeline.instruments.append(stages)
            result = pipeline.run(fxm, ctx)
            compression = result.model.compression
        seconds = time.perf_counter() - t0
        ppl = perplexity(model, eval_windows)
        seen_ppl = perplexity(model, calib_windows[:SEEN_WINDOWS]) if not text else None
        row = {
            "setting": name,
            "pipeline": text,
            "perplexity": ppl,
            "compress_s": seconds,
            "bytes": compressed_bytes(model, compression),
        }
        if count != args.calib_samples:
            row["calib_windows"] = count
        if seen_ppl is not None:
            row["calib_perplexity"] = seen_ppl
        removed = [
            r.stats["removed"]
            for r in (result.report.records if stages else [])
            if r.name == "remove-blocks"
        ]
        if removed:
            row["removed"] = removed[0]
        allocation = [
            r.stats["allocation"]["layer_sparsity"]
            for r in (result.report.records if stages else [])
            if "allocation" in r.stats
        ]
        if allocation:  # mean sparsity per kind of layer (q_proj, ..., lm_head)
            kinds: dict[str, list[float]] = {}
            for fqn, sp in allocation[0].items():
                kinds.setdefault(fqn.rsplit(".", 1)[-1], []).append(sp)
            row["allocation"] = {k: round(sum(v) / len(v), 3) for k, v in kinds.items()}
        if stages and len(stages.rows) > 1:
            row["stages"] = stages.rows
            row["train"] = {
                r.text: {k: v for k, v in r.stats.items() if k != "stage"}
                for r in result.report.records
                if r.name == "gqsa-train"
            }
        same = [i for i, r in enumerate(results) if r["setting"] == name]
        if same:
            results[same[0]] = row
        else:
            results.append(row)
        save_all()
        print(f"{name:<40} ppl {ppl:10.2f}  ({seconds:.0f} s)", flush=True)
    print(to_markdown(meta, results, args))


def kept_rows(previous: Path, meta: dict, calib_samples: int, replace: bool) -> list[dict]:
    """The rows of an earlier run into the same table that this run keeps: all whose pipeline
    (and calibration count) is still the one ROWS gives (a row run again then replaces its own).
    A table run with other settings is refused (ValueError) unless ``replace``, so a run with,
    say, another --calib-order cannot silently drop committed rows."""
    if not previous.is_file():
        return []
    old = json.loads(previous.read_text())
    if old.get("meta") != meta:
        if replace:
            return []
        differ = sorted(
            k
            for k in set(meta) | set(old.get("meta", {}))
            if old.get("meta", {}).get(k) != meta.get(k)
        )
        raise ValueError(
            f"{previous} holds {len(old.get('rows', []))} rows run with other settings "
            f"({', '.join(differ)} differ); pass --out to write another table, or --replace to "
            "start this one anew"
        )
    return [
        r
        for r in old["rows"]
        if r["setting"] in ROWS
        and row_spec(r["setting"], calib_samples)
        == (r["pipeline"], r.get("calib_windows", calib_samples))
    ]


def to_markdown(meta: dict, rows: list[dict], args) -> str:
    command = (
        f"python -m tools.quality.perplexity --windows {args.windows} --seqlen {args.seqlen} "
        f"--calib-samples {args.calib_samples}"
        + (f" --calib-order {args.calib_order}" if args.calib_order != "first" else "")
        + (f" --out {args.out}" if args.out != DEFAULT_OUT else "")
        + (" --rows 'NAME;...'" if args.rows else "")
    )
    base = next((r for r in rows if r["setting"] == "fp32"), rows[0])
    lines = [
        "# SmolLM2-135M perplexity under effc pipelines",
        "",
        f"Command: `{command}` (rows may come from several runs with these settings; each row's "
        "pipeline is in the table)  ",
        f"Model: {meta['model']}. Evaluation: {meta['eval']}. Calibration: {meta['calibration']}. "
        f"Split: {meta['split']}. Threads: {meta['threads']}.",
        "Bytes: the compressible linear layers (all 211, lm_head included, fewer where blocks are removed; a shared weight once); the embedding is fp32 except in the rows that quantize it (embedding int8|int4|tied).",
        "",
        "| setting | pipeline | perplexity | x fp32 | linear MB | values | indices | scales+zeros |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        b = r["bytes"]
        total = sum(b.values())
        own = f" ({r['calib_windows']} calibration windows)" if "calib_windows" in r else ""
        lines.append(
            f"| {r['setting']} | `{r['pipeline'] or '-'}`{own} | {r['perplexity']:.2f} | {r['perplexity'] / base['perplexity']:.2f} | "
            f"{total / 1e6:.1f} | {b['values'] / 1e6:.1f} | {b['indices'] / 1e6:.2f} | {b['scales'] / 1e6:.2f} |"
        )
    staged = [r for r in rows if r.get("stages")]
    if staged:
        lines += [
            "",
            "## Each stage's gain",
            "",
            "Perplexity after every lossy pass of a row (same evaluation windows), and the seconds "
            "that pass took (2 threads; the compression budget). Rows run since 2026-11-29 also "
            f"give the perplexity on the first {SEEN_WINDOWS} calibration windows, the text the training "
            "stages fit (fp32: "
            + (f"{seen:.2f}" if (seen := base.get("calib_perplexity")) else "-")
            + "): its gap to the evaluation windows is overfitting.",
            "",
            "| setting | after pass | perplexity | on calibration windows | pass seconds |",
            "|---|---|---:|---:|---:|",
        ]
        for r in staged:
            for st in r["stages"]:
                seen = st.get("calib_perplexity")
                lines.append(
                    f"| {r['setting']} | `{st['after']}` | {st['perplexity']:.2f} | "
                    f"{f'{seen:.2f}' if seen else '-'} | {st['seconds']:.0f} |"
                )
        lines.append("")
        for r in rows:
            if r.get("allocation"):
                lines.append(
                    f"- {r['setting']}: mean sparsity chosen per kind of layer: "
                    + ", ".join(f"{k} {v:.2f}" for k, v in r["allocation"].items())
                )
        budgets = [(r["setting"], t, v) for r in staged for t, v in r.get("train", {}).items()]
        if budgets:
            lines += [
                "",
                "Training budgets and losses (as stored in each pass's report):",
                "",
            ]
            lines += [f"- {name}, `{t}`: {json.dumps(v)}" for name, t, v in budgets]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
