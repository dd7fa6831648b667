"""effc's own greedy decode loop for LLaMA-style models, with a static KV cache.

It reuses the model's own modules (embedding, norms, and each linear layer, whichever it is:
``nn.Linear`` or a swapped-in ``BSRLinear``) and owns only what HF's ``generate()`` adds on top:
the cache (preallocated once, written in place), rotary tables (computed once), and attention on
the cache. So the time per token is the linear layers' time plus a thin, fixed overhead, and two
models that differ only in their linear layers compare fairly.

Works on HF ``LlamaForCausalLM`` (and its module names in ``effc.models.llama``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from effc.errors import UnsupportedError


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
    """Greedy decoding with a preallocated (layers, kv heads, max_len, head dim) cache."""

    def __init__(self, model: nn.Module, max_len: int = 512):
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

    def _norm(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """RMSNorm in five ops (HF's takes eight, with dtype round trips that are no-ops in fp32;
        ``F.rms_norm`` is not fused on CPU and costs more still)."""
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        weight = getattr(module, "weight", None)
        if "RMSNorm" not in type(module).__name__ or eps is None or weight is None:
            return module(x)
        return x * torch.rsqrt(x.square().mean(-1, keepdim=True).add_(eps)) * weight

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def _attention(self, i: int, attn, x: torch.Tensor, pos: int) -> torch.Tensor:
        t = x.shape[0]
        cos, sin = self.cos[pos : pos + t], self.sin[pos : pos + t]
        q = attn.q_proj(x).view(t, self.n_heads, self.head_dim).transpose(0, 1)
        k = attn.k_proj(x).view(t, self.n_kv, self.head_dim).transpose(0, 1)
        v = attn.v_proj(x).view(t, self.n_kv, self.head_dim).transpose(0, 1)
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
        out = out.view(self.n_heads, t, self.head_dim).transpose(0, 1).reshape(t, -1)
        return attn.o_proj(out)

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
        x = self.inner.embed_tokens(ids)
        for i, layer in enumerate(self.inner.layers):
            x = x + self._attention(i, layer.self_attn, self._norm(layer.input_layernorm, x), pos)
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
