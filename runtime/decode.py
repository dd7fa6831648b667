"""effc's own greedy decode loop for LLaMA-style models, with a static KV cache.

It reuses the model's own weights (embedding, norms, and each linear layer, whichever it is:
``nn.Linear`` or a swapped-in ``BSRLinear``) and owns only what HF's ``generate()`` adds on top:
the cache (preallocated once, written in place), rotary tables (computed once), and attention on
the cache. Two models that differ only in their linear layers compare fairly: the loop around the
linear layers is the same code for both.

At a decode step of a small model most of torch's time is per-op overhead (about 60 op calls a
layer for norms, rotary, attention and the MLP's glue), not arithmetic. So by default (``fused``)
a compiled plan (``Plan`` in ``effc/runtime/cpu/decode_ops.cpp``) runs the whole forward in one
call from Python, eight operators a layer:
- q/k/v and gate/up each as one linear layer over stacked weights (stacked BSR rows where all are
  ``BSRLinear`` of one kind, a stacked fp32 weight where all are ``nn.Linear``, else separate
  layers with their outputs concatenated), o and down, each calling effc's BSR kernels (or
  ATen's ``linear`` for dense weights) directly;
- RMSNorm with the residual add fused in, SiLU(gate) * up, and attention on the cache (rotary,
  cache write, causal scores, softmax, values).
``fused=False`` runs the same loop in torch ops with the model's own modules: the reference the
plan is tested against, and the fallback (``fused=None``) for models the plan cannot run
(non-RMSNorm norms, a non-SiLU MLP, linear layers other than fp32 ``nn.Linear`` / ``BSRLinear``).
The plan reads the model's weights when the decoder is built (stacked copies): build it after
the weights are final.

Works on HF ``LlamaForCausalLM`` (and its module names in ``effc.models.llama``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from effc.errors import UnsupportedError
from effc.models.llama import MLP
from effc.runtime.cpu import kernels
from effc.runtime.format import concat_rows
from effc.runtime.modules import BSRLinear

log = logging.getLogger(__name__)


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if isinstance(params, dict):
        kind = params.get("rope_type", params.get("type", "default"))
        if kind not in (None, "default"):
            raise UnsupportedError(f"decode loop supports default rotary embeddings, not {kind!r}")
        if "rope_theta" in params:
            return float(params["rope_theta"])
    theta = getattr(config, "rope_theta", None)
    if theta is None:
        raise UnsupportedError("model config names no rope_theta")
    return float(theta)


def _rms_attrs(module: nn.Module) -> tuple[torch.Tensor, float] | None:
    """(weight, eps) of an RMSNorm module (HF's or effc's) as it holds them, None for anything
    else."""
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    weight = getattr(module, "weight", None)
    if (
        "RMSNorm" not in type(module).__name__
        or eps is None
        or not isinstance(weight, torch.Tensor)
    ):
        return None
    return weight, eps


def _rms_params(module: nn.Module) -> tuple[torch.Tensor, float] | None:
    """(weight, eps) of an RMSNorm module in the plan's form (contiguous fp32, float eps)."""
    attrs = _rms_attrs(module)
    if attrs is None:
        return None
    return attrs[0].detach().float().contiguous(), float(attrs[1])


def _dense_spec(weight: torch.Tensor, bias: torch.Tensor | None):
    """The plan's form of a dense weight (out, in), which must be fp32."""

    if weight.dtype != torch.float32:
        raise UnsupportedError(f"fused decoding runs float32 weights, not {weight.dtype}")
    return kernels().Linear("dense", [weight.detach()], bias, weight.shape[0], 0, 0)


def _bias(module: nn.Module) -> torch.Tensor | None:
    return None if module.bias is None else module.bias.detach().float().contiguous()


def linear_spec(module: nn.Module):
    """The compiled plan's form of one linear layer (``kernels().Linear``): a ``BSRLinear`` (fp32
    or int8 activations) or an fp32 ``nn.Linear``; UnsupportedError for anything else."""

    if isinstance(module, BSRLinear):
        arrays = [module.indptr, module.indices, module.values, module.scales, module.zeros]
        kind = "bsr_a8" if module.a8 else "bsr"
        return kernels().Linear(
            kind, arrays, _bias(module), module.out_features, module.group, module.bits
        )
    if type(module) is nn.Linear:
        return _dense_spec(module.weight, _bias(module))
    raise UnsupportedError(
        f"fused decoding runs nn.Linear and BSRLinear, not {type(module).__name__}"
    )


def stacked_specs(modules: list[nn.Module]) -> list:
    """Plan parts for ``cat([m(x) for m in modules], -1)``: one ``BSRLinear`` over the stacked rows
    where all are ``BSRLinear`` of one group, bits and activation mode, one stacked fp32 weight
    where all are plain ``nn.Linear``, else each layer on its own (outputs concatenated)."""

    def stacked_bias():
        if all(m.bias is None for m in modules):
            return None
        return torch.cat(
            [_bias(m) if m.bias is not None else torch.zeros(m.out_features) for m in modules]
        )

    kinds = {
        (type(m), getattr(m, "group", 0), getattr(m, "bits", 0), getattr(m, "a8", 0))
        for m in modules
    }
    if len(kinds) == 1 and isinstance(modules[0], BSRLinear):
        matrix = concat_rows([m.matrix for m in modules])
        return [linear_spec(BSRLinear(matrix, stacked_bias(), modules[0].activations))]
    if len(kinds) == 1 and type(modules[0]) is nn.Linear:
        return [_dense_spec(torch.cat([m.weight.detach() for m in modules]), stacked_bias())]
    return [linear_spec(m) for m in modules]


def _is_silu_mlp(mlp: nn.Module) -> bool:

    act = getattr(mlp, "act_fn", None)
    if act is None:
        return isinstance(mlp, MLP)  # effc's own MLP calls silu directly
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def _tensors_read(module: nn.Module) -> tuple[int, int]:
    """Identity of the weight and bias a linear module computes with: modules that read the
    same tensors (Parameters shared by share-blocks, or one packed BSR copy) compute alike."""
    weight = module.values if isinstance(module, BSRLinear) else module.weight
    return id(weight), id(module.bias)


def _add_layer(plan, layer: nn.Module, memo: dict | None = None) -> None:
    """Add one decoder layer to the compiled plan, or raise UnsupportedError naming what it lacks.
    ``memo``: stacked weights already built for these modules' tensors (layers sharing their
    weights and biases after share-blocks, dense or swapped to BSR, share one stacked copy)."""
    memo = {} if memo is None else memo

    def stacked(modules):
        key = tuple(_tensors_read(m) for m in modules)
        if key not in memo:
            memo[key] = stacked_specs(modules)
        return memo[key]

    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    if attn is None or not all(hasattr(attn, n) for n in names):
        raise UnsupportedError("fused decoding needs self_attn with q_proj, k_proj, v_proj, o_proj")
    if mlp is None or not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
        raise UnsupportedError("fused decoding needs a gated MLP (gate_proj, up_proj, down_proj)")
    if not _is_silu_mlp(mlp):
        raise UnsupportedError("fused decoding needs a SiLU-gated MLP")
    norms = [
        _rms_params(getattr(layer, n, None))
        for n in ("input_layernorm", "post_attention_layernorm")
    ]
    if None in norms:
        raise UnsupportedError("fused decoding needs RMSNorm input and post-attention norms")
    plan.add_layer(
        stacked([attn.q_proj, attn.k_proj, attn.v_proj]),
        [linear_spec(attn.o_proj)],
        stacked([mlp.gate_proj, mlp.up_proj]),
        [linear_spec(mlp.down_proj)],
        *norms[0],
        *norms[1],
    )


@dataclass
class DecodeResult:
    tokens: list[int]
    prefill_s: float
    step_s: list[float] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        """Decode throughput: generated tokens after the first, per second of decode steps."""
        return len(self.step_s) / sum(self.step_s) if self.step_s else 0.0


class StaticDecoder:
    """Greedy decoding with a preallocated (layers, kv heads, max_len, head dim) cache.

    ``fused``: True runs the fused loop (an error where the model or this machine cannot), False the
    torch-op reference loop, None (default) the fused loop where it can run, else the reference."""

    def __init__(self, model: nn.Module, max_len: int = 512, fused: bool | None = None):
        inner = getattr(model, "model", None)
        if inner is None or not hasattr(inner, "layers") or not hasattr(model, "lm_head"):
            raise UnsupportedError("decode loop needs a LLaMA-style model (model.layers, lm_head)")
        cfg = model.config
        self.model, self.inner = model, inner
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.max_len = max_len
        inv = 1.0 / _rope_theta(cfg) ** (
            torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim
        )
        freqs = torch.outer(torch.arange(max_len, dtype=torch.float64), inv)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos, self.sin = emb.cos().float(), emb.sin().float()
        shape = (len(inner.layers), self.n_kv, max_len, self.head_dim)
        self.k_cache = torch.zeros(shape)
        self.v_cache = torch.zeros(shape)
        self.scale = self.head_dim**-0.5
        self.plan = None
        if fused is not False:
            try:
                self._build_fused()
            except UnsupportedError as e:
                if fused:
                    raise
                log.info("decoding with torch ops (%s)", e)

    @property
    def fused(self) -> bool:
        return self.plan is not None

    def _build_fused(self) -> None:

        if self.head_dim % 8:
            raise UnsupportedError(
                f"fused decoding needs a head dim that is a multiple of 8, not {self.head_dim}"
            )
        final = _rms_params(self.inner.norm)
        if final is None:
            raise UnsupportedError("fused decoding needs an RMSNorm final norm")
        plan = kernels().Plan(
            self.k_cache,
            self.v_cache,
            self.cos,
            self.sin,
            self.n_heads,
            self.scale,
            *final,
            [linear_spec(self.model.lm_head)],
        )
        memo: dict = {}
        for layer in self.inner.layers:
            _add_layer(plan, layer, memo)
        self.plan = plan

    def _norm(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """RMSNorm in five ops (HF's takes eight, with dtype round trips that are no-ops in fp32;
        ``F.rms_norm`` is not fused on CPU and costs more still)."""
        attrs = _rms_attrs(module)
        if attrs is None:
            return module(x)
        weight, eps = attrs
        return x * torch.rsqrt(x.square().mean(-1, keepdim=True).add_(eps)) * weight

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def _attention(self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: int):
        """Attention of ``t`` queries at pos .. pos+t-1 in torch ops; q, k, v (t, heads * head dim)
        as the projections give them. Writes this layer's cache; returns (t, heads * head dim)."""
        t = q.shape[0]
        cos, sin = self.cos[pos : pos + t], self.sin[pos : pos + t]
        q = q.view(t, self.n_heads, self.head_dim).transpose(0, 1)
        k = k.view(t, self.n_kv, self.head_dim).transpose(0, 1)
        v = v.view(t, self.n_kv, self.head_dim).transpose(0, 1)
        q = self._rotate(q, cos, sin)
        self.k_cache[i, :, pos : pos + t] = self._rotate(k, cos, sin)
        self.v_cache[i, :, pos : pos + t] = v
        keys = self.k_cache[i, :, : pos + t]
        values = self.v_cache[i, :, : pos + t]
        rep = self.n_heads // self.n_kv
        # grouped-query attention without copying the cache: fold the query heads of a group
        # into the query length; plain matmul + softmax (SDPA's math path costs more at t = 1)
        q = q.reshape(self.n_kv, rep * t, self.head_dim)
        scores = torch.baddbmm(self._bias(t, pos, rep), q, keys.transpose(1, 2), alpha=self.scale)
        out = torch.bmm(scores.softmax(-1), values)
        return out.view(self.n_heads, t, self.head_dim).transpose(0, 1).reshape(t, -1)

    def _bias(self, t: int, pos: int, rep: int) -> torch.Tensor:
        """Additive causal mask for ``t`` queries (repeated ``rep`` times) at ``pos``."""
        if t == 1:
            return torch.zeros(1, 1, 1)
        rows = torch.arange(t).repeat(rep)[:, None] + pos
        allowed = torch.arange(pos + t)[None, :] <= rows
        return torch.zeros(allowed.shape).masked_fill_(~allowed, float("-inf"))[None]

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, pos: int) -> torch.Tensor:
        """Logits of the last of ``ids`` (1-D), which sit at positions pos .. pos+len-1."""
        if ids.numel() == 0:
            raise UnsupportedError("no tokens to decode from (empty prompt)")
        if self.plan is not None:
            if pos < 0 or pos + ids.numel() > self.max_len:
                raise UnsupportedError(
                    f"positions {pos}..{pos + ids.numel() - 1} exceed the cache ({self.max_len})"
                )
            x = self.inner.embed_tokens(ids).float().contiguous()
            return self.plan.forward(x, pos)[0]
        x = self.inner.embed_tokens(ids)
        for i, layer in enumerate(self.inner.layers):
            attn, h = layer.self_attn, self._norm(layer.input_layernorm, x)
            out = self._attention(i, attn.q_proj(h), attn.k_proj(h), attn.v_proj(h), pos)
            x = x + attn.o_proj(out)
            x = x + layer.mlp(self._norm(layer.post_attention_layernorm, x))
        return self.model.lm_head(self._norm(self.inner.norm, x[-1:]))[0]

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int) -> DecodeResult:
        prompt = prompt.reshape(-1)
        if prompt.numel() + max_new_tokens > self.max_len:
            raise UnsupportedError(
                f"prompt ({prompt.numel()}) + new tokens ({max_new_tokens}) exceed the cache "
                f"({self.max_len})"
            )
        t0 = time.perf_counter()
        token = int(self.forward(prompt, 0).argmax())
        result = DecodeResult([token], time.perf_counter() - t0)
        pos = prompt.numel()
        for _ in range(max_new_tokens - 1):
            t0 = time.perf_counter()
            token = int(self.forward(torch.tensor([token]), pos).argmax())
            result.step_s.append(time.perf_counter() - t0)
            result.tokens.append(token)
            pos += 1
        return result
