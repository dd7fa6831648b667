"""The ``affine`` and ``linear-chain`` rules on FX graphs (torch.export, aten ops).

Same math as the ONNX forms in ``affine.py`` (the ``LinearOp`` weight algebra is shared):
``aten.conv2d`` / ``aten.linear`` with constant (get_attr) weights; per-channel constants are
get_attr tensors or Python scalars. Rewrites write new attributes on the graph module and leave
the user's module untouched (like the batchnorm rule).
"""

from __future__ import annotations

import operator

import numpy as np
import torch

from effc.ir.model import attr_tensor
from effc.passes.fuse._fx import commit, frozen_params
from effc.passes.fuse.affine import LinearOp, channel_vector

aten = torch.ops.aten
_MUL = {aten.mul.Tensor, aten.mul.Scalar, operator.mul}
_ADD = {aten.add.Tensor, aten.add.Scalar, operator.add}


def _const(gm, arg) -> np.ndarray | None:
    if isinstance(arg, (int, float)) and not isinstance(arg, bool):
        return np.array(arg, dtype=np.float32)
    if getattr(arg, "op", None) == "get_attr":
        t = attr_tensor(gm, arg.target)
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return t.detach().cpu().numpy()
    return None


def _rank(node) -> int | None:
    val = node.meta.get("val") if hasattr(node, "meta") else None
    return val.dim() if isinstance(val, torch.Tensor) else None


class _FxLinear(LinearOp):
    """``LinearOp`` over an FX conv2d / linear call (weights as numpy, written back as attrs)."""

    def __init__(self, gm, node):
        self.gm = gm
        if node.target == aten.conv2d.default:
            args = list(node.args) + [None] * (7 - len(node.args))
            w, b = _const(gm, args[1]), _const(gm, args[2]) if args[2] is not None else None
            super().__init__(node, w, b, "conv")
            self._groups = int(args[6] or 1)
            self.padded = any(args[4] or [0]) if not isinstance(args[4], str) else True
            self.pointwise = (
                w is not None
                and w.shape[2:] == (1, 1)
                and all(s == 1 for s in (args[3] or [1]))
                and not self.padded
                and all(d == 1 for d in (args[5] or [1]))
            )
            self.ok = w is not None and (args[2] is None or b is not None)
        else:
            w = _const(gm, node.args[1])
            bias_arg = node.args[2] if len(node.args) > 2 else None
            b = _const(gm, bias_arg) if bias_arg is not None else None
            super().__init__(node, None if w is None else w.T, b, "matmul")
            self._groups, self.padded, self.pointwise = 1, False, True
            self.ok = w is not None and w.ndim == 2 and (bias_arg is None or b is not None)

    @classmethod
    def of(cls, gm, node, frozen: set[str]):
        if getattr(node, "op", None) != "call_function":
            return None
        if node.target not in (aten.conv2d.default, aten.linear.default):
            return None
        if getattr(node.args[1], "target", None) in frozen:
            return None  # folding would move a compressed weight off its grid
        lin = cls(gm, node)
        return lin if lin.ok else None

    @property
    def groups(self) -> int:
        return self._groups

    def write(self, source) -> None:
        """Point the call at ``source`` and at new weight (and bias) attributes."""
        gm, node = self.gm, self.node
        base = f"_effc_folded_{node.name}"
        w = self.weight if self.kind == "conv" else self.weight.T
        gm.register_buffer(f"{base}_w", torch.from_numpy(np.ascontiguousarray(w)).float())
        args = list(node.args) + [None] * (3 - len(node.args))
        with gm.graph.inserting_before(node):
            args[1] = gm.graph.get_attr(f"{base}_w")
            if self.bias is not None:
                gm.register_buffer(f"{base}_b", torch.from_numpy(self.bias.reshape(-1)).float())
                args[2] = gm.graph.get_attr(f"{base}_b")
        args[0] = source
        node.args = tuple(args)


def _split(gm, node):
    """(tensor input, constant) of a binary mul/add with one constant operand."""
    a, b = node.args[0], node.args[1]
    ca, cb = _const(gm, a), _const(gm, b)
    if cb is not None and ca is None and hasattr(a, "op"):
        return a, cb
    if ca is not None and cb is None and hasattr(b, "op"):
        return b, ca
    return None


def affine_fx(model) -> int:
    gm = model.graph_module
    frozen = frozen_params(model)
    fired = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _MUL | _ADD:
            continue
        split = _split(gm, node)
        if split is None or _rank(node) is None:
            continue
        x, c = split
        is_mul = node.target in _MUL
        lin = _FxLinear.of(gm, x, frozen)
        if lin is not None and len(x.users) == 1:  # after the linear op
            vec = channel_vector(c, _rank(node), lin.channel_axis, lin.out_channels)
            if vec is None or (is_mul and lin.bias is not None and lin.bias.size != vec.size):
                continue
            if is_mul:
                lin.scale_out(vec)
            else:
                lin.add_bias(vec)
            lin.write(lin.node.args[0])
            node.replace_all_uses_with(lin.node)
            fired += 1
            continue
        users = list(node.users)
        lins = [_FxLinear.of(gm, u, frozen) for u in users]
        if not users or any(li is None or li.node.args[0] is not node for li in lins):
            continue  # before: every consumer a linear op reading it as its input
        if _rank(x) != _rank(node):
            continue
        vecs = [channel_vector(c, _rank(node), li.channel_axis, li.in_channels) for li in lins]
        if any(v is None for v in vecs) or (not is_mul and any(li.padded for li in lins)):
            continue
        for lin, vec in zip(lins, vecs):
            if is_mul:
                lin.scale_in(vec)
            else:
                lin.shift_in(vec)
            lin.write(x)
        fired += 1
    return commit(model, gm, fired)


def linear_chain_fx(model) -> int:
    gm = model.graph_module
    frozen = frozen_params(model)
    fired = 0
    for node in list(gm.graph.nodes):
        second = _FxLinear.of(gm, node, frozen)
        first = _FxLinear.of(gm, node.args[0], frozen) if second is not None else None
        if first is None or len(first.node.users) != 1 or first.kind != second.kind:
            continue
        if first.kind == "conv" and not (
            first.pointwise and second.pointwise and first.groups == second.groups == 1
        ):
            continue
        w1 = first.weight[:, :, 0, 0] if first.kind == "conv" else first.weight.T
        w2 = second.weight[:, :, 0, 0] if second.kind == "conv" else second.weight.T
        cin, cmid, cout = w1.shape[1], w1.shape[0], w2.shape[0]
        if cin * cout > cin * cmid + cmid * cout:
            continue
        w = (w2.astype(np.float64) @ w1.astype(np.float64)).astype(np.float32)
        bias = np.zeros(cout) if (first.bias is not None or second.bias is not None) else None
        if first.bias is not None:
            bias = bias + w2.astype(np.float64) @ first.bias.reshape(-1)
        if second.bias is not None:
            bias = bias + second.bias.reshape(-1)
        second.weight = w[:, :, None, None] if second.kind == "conv" else w.T
        second.bias = None if bias is None else bias.astype(np.float32)
        second.write(first.node.args[0])
        fired += 1
    return commit(model, gm, fired)
