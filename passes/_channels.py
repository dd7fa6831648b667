"""Channel regions of convolutional networks for ``rearrange{target=blocks}`` (SparseByteNN's
whole-network channel rearrangement), on both IRs.

A region starts at a producer: a dense (groups 1) convolution or linear layer. Its output
channels may be permuted for free when they flow, each value used once, only through
channel-wise operators (BatchNorm, ReLU/ReLU6/Clip/HardTanh, a depthwise convolution, global
average pooling and flattening to (N, C)) into one consumer (a groups-1 convolution or a linear
layer) reading them as input channels: permuting the producer's rows and bias, every BatchNorm
parameter, the depthwise weights and bias by ``p``, and the consumer's input channels by the same
``p`` computes the same function (only the consumer's summation order changes). A value with a
second user (a residual add, a concat, a model output) ends the walk without a region: what it
feeds would see the permutation. Every region is a list of (tensor, axis) to permute.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
import torch

from effc.ir.model import attr_tensor
from effc.ir.sites import fx_fqn, weight_sites

aten = torch.ops.aten
_FX_CHANNELWISE = {
    aten.relu.default,
    aten.relu_.default,
    aten.hardtanh.default,
    aten.hardtanh_.default,
    aten.clamp.default,
    aten.clone.default,
    aten.dropout.default,  # an inference graph's dropout (train=False) is the identity
}
_ONNX_CHANNELWISE = {
    "Relu",
    "Clip",
    "LeakyRelu",
    "Sigmoid",
    "HardSigmoid",
    "HardSwish",
    "Identity",
    "Dropout",
}


@dataclass
class ChannelRegion:
    producer: str  # FQN of the producer's weight site
    consumer: str
    channels: int
    members: list[str] = field(default_factory=list)  # what the channels pass through
    # (get, set, axis): read the tensor, write it back permuted
    tensors: list[tuple] = field(default_factory=list)

    def weight(self) -> torch.Tensor:
        """The producer's weight as (out, in * k) (the first registered tensor)."""
        get, _, _ = self.tensors[0]
        w = get()
        return w.reshape(w.shape[0], -1).float()

    def apply(self, perm: torch.Tensor) -> None:
        for get, put, axis in self.tensors:
            t = get()
            put(t.index_select(axis, perm.to(t.device)))


# ---------------------------------------------------------------- FX
def _fx_tensor(gm, node, axis: int):
    t = attr_tensor(gm, node.target)

    def put(v, t=t):
        with torch.no_grad():
            t.copy_(v)

    return (lambda t=t: t.detach().clone(), put, axis)


def _conv_groups(n) -> int:
    return int(n.args[6]) if len(n.args) > 6 else 1


def fx_regions(model) -> list[ChannelRegion]:
    gm = model.graph_module
    uses: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            uses[n.target] = uses.get(n.target, 0) + len(n.users)

    def is_attr(a) -> bool:
        return getattr(a, "op", None) == "get_attr" and uses.get(a.target) == 1

    def dense(n) -> bool:
        if n.op != "call_function" or not is_attr(n.args[1]):
            return False
        if n.target == aten.linear.default:
            return True
        return n.target == aten.conv2d.default and _conv_groups(n) == 1

    regions = []
    for prod in gm.graph.nodes:
        if not dense(prod):
            continue
        channels = attr_tensor(gm, prod.args[1].target).shape[0]
        tensors = [_fx_tensor(gm, prod.args[1], 0)]
        if len(prod.args) > 2 and prod.args[2] is not None:
            if not is_attr(prod.args[2]):
                continue
            tensors.append(_fx_tensor(gm, prod.args[2], 0))
        members, v, ok = [], prod, True
        while ok:
            if len(v.users) != 1:
                ok = False
                break
            (u,) = v.users
            if u.op != "call_function" or u.args[0] is not v:
                ok = False
            elif u.target == aten.batch_norm.default:
                params = [a for a in u.args[1:5] if a is not None]
                ok = all(is_attr(a) for a in params)
                tensors += [_fx_tensor(gm, a, 0) for a in params]
                members.append(u.name)
                v = u
            elif u.target in _FX_CHANNELWISE and not (
                u.target == aten.dropout.default and len(u.args) > 2 and u.args[2]
            ):
                members.append(u.name)
                v = u
            elif u.target == aten.adaptive_avg_pool2d.default or (
                u.target == aten.mean.dim and sorted(u.args[1]) in ([2, 3], [-2, -1])
            ):
                members.append(u.name)
                v = u
            elif u.target == aten.flatten.using_ints and tuple(u.args[1:2]) == (1,):
                shape = u.meta.get("val")
                ok = shape is not None and shape.dim() == 2 and shape.shape[1] == channels
                members.append(u.name)
                v = u
            elif (
                u.target == aten.conv2d.default
                and _conv_groups(u) == channels
                and is_attr(u.args[1])
            ):
                if attr_tensor(gm, u.args[1].target).shape[0] != channels:
                    ok = False
                    break
                tensors.append(_fx_tensor(gm, u.args[1], 0))
                if len(u.args) > 2 and u.args[2] is not None:
                    ok = is_attr(u.args[2])
                    tensors.append(_fx_tensor(gm, u.args[2], 0))
                members.append(u.name)
                v = u
            elif dense(u):
                tensors.append(_fx_tensor(gm, u.args[1], 1))
                regions.append(
                    ChannelRegion(
                        fx_fqn(prod, prod.args[1].target),
                        fx_fqn(u, u.args[1].target),
                        channels,
                        members,
                        tensors,
                    )
                )
                break
            else:
                ok = False
    return regions


# ---------------------------------------------------------------- ONNX
def _onnx_tensor(value: ir.Value, axis: int):
    def get(value=value):
        return torch.from_numpy(np.array(value.const_value.numpy(), copy=True))

    def put(t, value=value):
        value.const_value = ir.tensor(np.ascontiguousarray(t.numpy()), name=value.name)

    return (get, put, axis)


def onnx_regions(model, site_names: dict) -> list[ChannelRegion]:
    """``site_names``: {id(node): weight-site FQN} of the Conv/Gemm/MatMul sites."""
    graph = model.model.graph
    uses: dict[int, int] = {}
    for n in graph.all_nodes():
        for x in n.inputs:
            if x is not None and x.is_initializer():
                uses[id(x)] = uses.get(id(x), 0) + 1

    def const(x) -> bool:
        return (
            x is not None and x.is_initializer() and x.const_value is not None and uses[id(x)] == 1
        )

    def group(n) -> int:
        return n.attributes["group"].as_int() if "group" in n.attributes else 1

    def dense(n) -> bool:
        if id(n) not in site_names or not const(n.inputs[1]):
            return False
        if n.op_type == "Conv":
            return group(n) == 1
        if n.op_type == "Gemm":
            return "transB" in n.attributes and n.attributes["transB"].as_int() == 1
        return n.op_type == "MatMul"

    regions = []
    for prod in graph.all_nodes():
        if not dense(prod) or prod.op_type == "MatMul":
            continue
        w = prod.inputs[1]
        channels = int(w.const_value.shape[0])
        tensors = [_onnx_tensor(w, 0)]
        if len(prod.inputs) > 2 and prod.inputs[2] is not None:
            if not const(prod.inputs[2]):
                continue
            tensors.append(_onnx_tensor(prod.inputs[2], 0))
        members, v, ok = [], prod.outputs[0], True
        while ok:
            users = list(v.uses())
            if len(users) != 1 or v.is_graph_output():
                break
            u, index = users[0]
            if index != 0:
                break
            if u.op_type == "BatchNormalization":
                params = list(u.inputs[1:5])
                ok = all(const(p) for p in params)
                tensors += [_onnx_tensor(p, 0) for p in params]
            elif u.op_type in _ONNX_CHANNELWISE:
                ok = all(
                    x is None or x.const_value is not None and x.const_value.size == 1
                    for x in u.inputs[1:]
                )
            elif u.op_type == "GlobalAveragePool":
                pass
            elif u.op_type == "ReduceMean":  # over the spatial axes only (axes as an input)
                axes = u.inputs[1] if len(u.inputs) > 1 else None
                got = (
                    axes.const_value.numpy().tolist()
                    if axes is not None and axes.const_value is not None
                    else None
                )
                ok = got is not None and sorted(got) in ([2, 3], [-2, -1])
            elif u.op_type == "Reshape":  # (N, C, 1, 1) -> (N, C)
                shape = u.outputs[0].shape
                ok = shape is not None and len(shape) == 2 and shape[1] == channels
            elif u.op_type == "Flatten":
                axis = u.attributes["axis"].as_int() if "axis" in u.attributes else 1
                ok = axis == 1
            elif u.op_type == "Conv" and group(u) == channels and const(u.inputs[1]):
                ok = int(u.inputs[1].const_value.shape[0]) == channels
                tensors.append(_onnx_tensor(u.inputs[1], 0))
                if len(u.inputs) > 2 and u.inputs[2] is not None:
                    ok = ok and const(u.inputs[2])
                    tensors.append(_onnx_tensor(u.inputs[2], 0))
            elif dense(u) and u.op_type in ("Conv", "Gemm"):
                tensors.append(_onnx_tensor(u.inputs[1], 1))
                regions.append(
                    ChannelRegion(
                        site_names[id(prod)], site_names[id(u)], channels, members, tensors
                    )
                )
                break
            else:
                ok = False
            members.append(u.name or u.op_type)
            v = u.outputs[0]
    return regions


# ---------------------------------------------------------------- the order
def _first_component(profiles: torch.Tensor) -> torch.Tensor:
    """Each column's coordinate on the first principal component of the columns."""
    c = profiles - profiles.mean(1, keepdim=True)
    u, _, _ = torch.linalg.svd(c.T, full_matrices=False)
    return u[:, 0]


def pca_order(profiles: torch.Tensor) -> torch.Tensor:
    return _first_component(profiles).argsort(stable=True)


def bisect_order(profiles: torch.Tensor, group: int) -> torch.Tensor:
    """Recursive balanced bisection along the first principal component: consecutive runs of
    ``group`` columns of the result are the clusters."""
    out: list[torch.Tensor] = []

    def split(idx: torch.Tensor) -> None:
        if len(idx) <= group:
            out.append(idx)
            return
        order = idx[_first_component(profiles[:, idx]).argsort(stable=True)]
        half = (len(idx) // group // 2) * group
        split(order[:half])
        split(order[half:])

    split(torch.arange(profiles.shape[1]))
    return torch.cat(out)


def kept_importance(scores: torch.Tensor, rows: int, sparsity: float) -> float:
    """Share of the importance ``scores`` (out, k) kept when the best (1 - sparsity) of the
    rows x 1 blocks (consecutive rows, one column) are kept, layer-wide."""
    o, k = scores.shape
    blocks = scores.view(o // rows, rows, k).sum(1).reshape(-1)
    keep = round((1 - sparsity) * blocks.numel())
    return float(blocks.topk(keep).values.sum() / scores.sum().clamp_min(1e-30))


def row_orders(scores: torch.Tensor, rows: int) -> dict[str, torch.Tensor]:
    """Candidate row orders: identity, rows sorted by the first principal component of their
    normalised importance profiles, and a balanced bisection into groups of ``rows``."""
    p = scores.double() / scores.double().sum(1, keepdim=True).clamp_min(1e-30)
    p = p - p.mean(1, keepdim=True)
    profiles = (p / p.norm(dim=1, keepdim=True).clamp_min(1e-30)).T  # (k, out): rows as columns
    return {
        "identity": torch.arange(scores.shape[0]),
        "pca": pca_order(profiles),
        "bisect": bisect_order(profiles, rows),
    }


# ---------------------------------------------------------------- BatchNorm output scales
def _bn_scale(gamma: torch.Tensor | None, var: torch.Tensor, eps: float) -> torch.Tensor:
    s = 1.0 / torch.sqrt(var.detach().double() + eps)  # gamma is a Parameter: no autograd graph
    return (s if gamma is None else gamma.detach().double().abs() * s).float()


def output_scales(model) -> dict[str, torch.Tensor]:
    """{weight-site FQN: per-output-channel factor} for every conv/linear whose output goes
    only into an inference BatchNorm with constant parameters: |gamma| / sqrt(var + eps), the
    factor BatchNorm multiplies each output channel by. An importance score compares weights of
    different output channels, so it must see the weights as the network uses them (BatchNorm
    folded in); without the factor a channel BatchNorm scales up 10x looks 10x less important.
    Layers with no such BatchNorm are absent (factor 1)."""
    out: dict[str, torch.Tensor] = {}
    if model.kind == "fx":
        gm = model.graph_module
        for n in gm.graph.nodes:
            if n.op != "call_function" or n.target not in (
                aten.conv1d.default,
                aten.conv2d.default,
                aten.conv3d.default,
                aten.linear.default,
            ):
                continue
            w = n.args[1]
            if getattr(w, "op", None) != "get_attr" or len(n.users) != 1:
                continue
            (u,) = n.users
            if u.target != aten.batch_norm.default or u.args[0] is not n or u.args[5]:
                continue
            gamma, var = u.args[1], u.args[4]
            if getattr(var, "op", None) != "get_attr" or (
                gamma is not None and getattr(gamma, "op", None) != "get_attr"
            ):
                continue
            out[fx_fqn(n, w.target)] = _bn_scale(
                None if gamma is None else attr_tensor(gm, gamma.target),
                attr_tensor(gm, var.target),
                float(u.args[7]),
            )
        return out
    for site in weight_sites(model):
        node = site.node
        if node is None or node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        v = node.outputs[0]
        users = list(v.uses())
        if len(users) != 1 or v.is_graph_output():
            continue
        u, index = users[0]
        if u.op_type != "BatchNormalization" or index != 0:
            continue
        gamma, var = u.inputs[1], u.inputs[4]
        if any(x is None or x.const_value is None for x in (gamma, var)):
            continue
        eps = u.attributes["epsilon"].as_float() if "epsilon" in u.attributes else 1e-5
        out[site.fqn] = _bn_scale(
            torch.from_numpy(np.array(gamma.const_value.numpy(), dtype=np.float64)),
            torch.from_numpy(np.array(var.const_value.numpy(), dtype=np.float64)),
            eps,
        )
    return out
