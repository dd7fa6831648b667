"""Rule ``batchnorm``: fold an inference BatchNorm into the conv (or Gemm) before it.

Math: BN(y) = gamma * (y - mean) / sqrt(var + eps) + beta. With s = gamma / sqrt(var + eps)
per output channel and y = W * x + b, BN(y) = (s * W) * x + (s * (b - mean) + beta): scale
each output channel's weights by s and replace the bias. Exact up to float rounding.
"""

from __future__ import annotations

import operator

import torch
from onnxscript.rewriter import RewriteRuleSet
from onnxscript.rewriter.rules.common import (
    fuse_batchnorm_into_conv_rule,
    fuse_batchnorm_into_conv_transpose_rule,
    fuse_batchnorm_into_gemm_rule,
)
from torch import nn

from effc.ir.model import attr_tensor
from effc.passes.fuse._fx import commit, frozen_params


def fuse_batchnorm_onnx() -> RewriteRuleSet:
    """onnxscript's checked rules (constant weights and BN params, single use)."""
    return RewriteRuleSet(
        [
            fuse_batchnorm_into_conv_rule,
            fuse_batchnorm_into_conv_transpose_rule,
            fuse_batchnorm_into_gemm_rule,
        ]
    )


aten = torch.ops.aten
_CONVS = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default}


def _bn_params(bn) -> tuple | None:
    """(bn output node to replace, weight, bias, mean, var, eps) for an inference BN node."""
    if bn.target == aten.batch_norm.default:
        _, w, b, mean, var, training, _momentum, eps, _ = bn.args
        return None if training else (bn, w, b, mean, var, eps)
    if bn.target == aten._native_batch_norm_legit_no_training.default:
        _, w, b, mean, var, _momentum, eps = bn.args
        users = list(bn.users)
        if all(u.target is operator.getitem for u in users) and {u.args[1] for u in users} == {0}:
            return (users[0] if len(users) == 1 else None, w, b, mean, var, eps)
    return None


def _attr(gm, node) -> torch.Tensor | None:
    if node is None or getattr(node, "op", None) != "get_attr":
        return None
    return attr_tensor(gm, node.target)


def _set(gm, target: str, value: torch.Tensor) -> None:
    owner, _, leaf = target.rpartition(".")
    module = gm.get_submodule(owner) if owner else gm
    setattr(module, leaf, nn.Parameter(value, requires_grad=False))


def fuse_batchnorm_fx(model) -> int:
    """Fold every conv -> inference batch_norm pair in the FX graph; return how many."""
    gm = model.graph_module
    frozen = frozen_params(model)
    fired = 0
    for bn in list(gm.graph.nodes):
        if bn.op != "call_function":
            continue
        params = _bn_params(bn)
        conv = bn.args[0] if params else None
        if conv is None or conv.op != "call_function" or conv.target not in _CONVS:
            continue
        if len(conv.users) != 1 or getattr(conv.args[1], "target", None) in frozen:
            continue
        out_node, w_n, b_n, mean_n, var_n, eps = params
        gamma, beta, mean, var = (_attr(gm, n) for n in (w_n, b_n, mean_n, var_n))
        weight = _attr(gm, conv.args[1])
        bias_node = conv.args[2] if len(conv.args) > 2 else None
        bias = _attr(gm, bias_node) if bias_node is not None else None
        if any(t is None for t in (mean, var, weight)) or (bias_node is not None and bias is None):
            continue
        with torch.no_grad():
            gamma = gamma if gamma is not None else torch.ones_like(mean)
            beta = beta if beta is not None else torch.zeros_like(mean)
            scale = gamma / torch.sqrt(var + eps)
            new_w = weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))
            new_b = (bias if bias is not None else torch.zeros_like(mean)) - mean
            new_b = new_b * scale + beta
        w_target = conv.args[1].target
        _set(gm, w_target, new_w)
        owner = w_target.rpartition(".")[0]
        b_target = (
            bias_node.target
            if bias_node is not None
            else ".".join(filter(None, [owner, "bn_folded_bias"]))
        )
        _set(gm, b_target, new_b)
        with gm.graph.inserting_before(conv):
            new_bias_node = gm.graph.get_attr(b_target)
        args = list(conv.args)
        while len(args) < 3:
            args.append(None)
        args[2] = new_bias_node
        conv.args = tuple(args)
        out_node.replace_all_uses_with(conv)
        for node in (out_node, bn):
            if node in gm.graph.nodes and not node.users:
                gm.graph.erase_node(node)
        fired += 1
    return commit(model, gm, fired)
