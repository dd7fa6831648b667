"""Weight sites: the Linear/MatMul/Gemm/Conv weights of a model, on both IRs (DESIGN.md section 4).

A site is named by its module's fully qualified name (``model.layers.3.mlp.down_proj``) and is
always viewed as (out, in) for linear layers and (out, in/groups, kh, kw) for convolutions: a
"row" is one output channel and groups run along the input dimension. Tied weights (an
embedding reused as lm_head) are one site with ``tied_with`` naming the other use.

FX sites are read from the traced graph (aten.linear / aten.conv*) and edited in the source
nn.Module, which the trace shares its parameters with. ONNX sites are MatMul (weights stored
in x out), Gemm (transB decides) and Conv nodes whose weight is a constant initializer; their
name comes from the initializer (``features.0.weight``), else the exporter's
``pkg.torch.onnx.name_scopes`` metadata, else the legacy exporter's node name
(``/encoder/layer.0/attention/self/query/MatMul``).
"""

from __future__ import annotations

import ast
import atexit
import itertools
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
import torch

from effc.errors import UnsupportedError
from effc.ir.model import attr_tensor

aten = torch.ops.aten
_FX_OPS = {
    aten.linear.default: "linear",
    aten.conv1d.default: "conv",
    aten.conv2d.default: "conv",
    aten.conv3d.default: "conv",
}
_GENERATED = re.compile(r"^(val_\d+|onnx::.*|_?v_?\d+|.*_bias)$")


@dataclass
class WeightSite:
    fqn: str
    op: str  # linear | conv
    shape: tuple[int, ...]  # the (out, in[, k...]) view
    groups: int = 1
    tied_with: list[str] = field(default_factory=list)
    handle: object = field(default=None, repr=False, compare=False)
    node: object = field(default=None, repr=False, compare=False)  # the ONNX MatMul/Gemm/Conv
    # other layers reading the same weight (blocks sharing parameters): (fqn, ONNX node or None);
    # calibration sums their inputs into this site's statistics
    users: list = field(default_factory=list, repr=False, compare=False)

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        """Input channels (for a conv: in/groups per group times groups)."""
        return self.shape[1] * self.groups


# ---------------------------------------------------------------- FX
def fx_fqn(node, weight_target: str) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        return list(stack.values())[-1][0]
    return weight_target.removesuffix(".weight")


def _fx_sites(model) -> list[WeightSite]:
    gm = model.graph_module
    sites: dict[str, WeightSite] = {}
    embeddings: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target == aten.embedding.default and node.args[0].op == "get_attr":
            embeddings[node.args[0].target] = fx_fqn(node, node.args[0].target)
        kind = _FX_OPS.get(node.target)
        if kind is None or getattr(node.args[1], "op", None) != "get_attr":
            continue
        target = node.args[1].target
        weight = attr_tensor(gm, target)
        if not isinstance(weight, torch.Tensor):
            continue
        groups = int(node.args[6]) if kind == "conv" and len(node.args) > 6 else 1
        fqn = fx_fqn(node, target)
        if target in sites:  # a parameter several layers share: one site, the first layer's
            if fqn != sites[target].fqn:
                sites[target].users.append((fqn, None))
            continue
        sites[target] = WeightSite(fqn, kind, tuple(weight.shape), groups, handle=weight)
    for target, emb in embeddings.items():
        if target in sites and emb != sites[target].fqn:
            sites[target].tied_with.append(emb)
    return list(sites.values())


# ---------------------------------------------------------------- ONNX
def _scope_fqn(node: ir.Node) -> str | None:
    scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    if scopes:
        try:
            names = ast.literal_eval(scopes)
        except (ValueError, SyntaxError):
            names = []
        if len(names) >= 2 and names[-2]:
            return names[-2]
    if node.name and node.name.startswith("/"):
        parts = node.name.strip("/").split("/")
        if len(parts) >= 2:
            return ".".join(parts[:-1])
    return None


def _onnx_fqn(node: ir.Node, weight: ir.Value) -> str:
    name = weight.name or ""
    if name.endswith(".weight") and not _GENERATED.match(name):
        return name.removesuffix(".weight")
    return _scope_fqn(node) or name or node.name


def _weight_input(node: ir.Node) -> tuple[ir.Value, bool] | None:
    """The constant initializer behind a MatMul/Gemm weight, and whether it is stored in x out.

    A ``Transpose(perm=[1, 0])`` of an initializer (how the exporter writes a tied lm_head) is
    looked through."""
    value = node.inputs[1]
    transposed = node.op_type == "MatMul"
    if (
        node.op_type == "Gemm"
        and "transB" in node.attributes
        and node.attributes["transB"].as_int()
    ):
        transposed = False
    producer = value.producer() if value is not None else None
    if (
        producer is not None
        and producer.op_type == "Transpose"
        and producer.domain in ("", "ai.onnx")
        and list(producer.attributes["perm"].as_ints()) == [1, 0]
    ):
        value, transposed = producer.inputs[0], not transposed
    if value is None or not value.is_initializer() or value.const_value is None:
        return None
    return value, transposed


def _onnx_sites(model) -> list[WeightSite]:
    graph = model.model.graph
    sites: list[WeightSite] = []
    tables: list[tuple[str, np.ndarray]] = []
    for node in graph.all_nodes():
        op = node.op_type if node.domain in ("", "ai.onnx") else None
        table = node.inputs[0] if op == "Gather" else None
        if (
            table is not None
            and table.const_value is not None
            and len(table.const_value.shape) == 2
        ):
            tables.append((_scope_fqn(node) or table.name, table.const_value.numpy()))
        if op not in ("MatMul", "Gemm", "Conv") or len(node.inputs) < 2:
            continue
        if op == "Conv":
            w = node.inputs[1]
            if w is None or not w.is_initializer() or w.const_value is None:
                continue
            groups = node.attributes["group"].as_int() if "group" in node.attributes else 1
            shape = tuple(w.const_value.shape.numpy())
            sites.append(
                WeightSite(_onnx_fqn(node, w), "conv", shape, groups, handle=(w, False), node=node)
            )
            continue
        if op == "Gemm" and "transA" in node.attributes and node.attributes["transA"].as_int():
            continue
        found = _weight_input(node)
        if found is None or len(found[0].const_value.shape) != 2:
            continue
        value, transposed = found
        shape = tuple(value.const_value.shape.numpy())
        shape = shape[::-1] if transposed else shape
        sites.append(
            WeightSite(
                _onnx_fqn(node, value), "linear", shape, handle=(value, transposed), node=node
            )
        )
    first: dict[int, WeightSite] = {}  # weights several nodes read (shared blocks): one site
    merged = []
    for site in sites:
        key = id(site.handle[0])
        if key in first and first[key].handle[1] == site.handle[1] and first[key].op == site.op:
            # named by the reader's scope (the weight's name is the first reader's)
            first[key].users.append((_scope_fqn(site.node) or site.fqn, site.node))
            continue
        first.setdefault(key, site)
        merged.append(site)
    sites = merged
    for site in sites:
        if site.op != "linear":
            continue
        view = read_weight_onnx(site)
        for fqn, table in tables:
            if fqn != site.fqn and table.shape == view.shape and np.array_equal(table, view):
                site.tied_with.append(fqn)
    return sites


def embedding_sites(model) -> list[WeightSite]:
    """Embedding tables (vocab x hidden) read by a row lookup: ``aten.embedding`` of a parameter
    on FX, ``Gather(axis=0)`` of a 2-D float initializer on ONNX; one site per table, op
    ``embedding``, handles as for weight sites (so read_weight/write_weight work)."""
    sites: dict[object, WeightSite] = {}
    if model.kind == "fx":
        gm = model.graph_module
        for node in gm.graph.nodes:
            if node.op != "call_function" or node.target != aten.embedding.default:
                continue
            if node.args[0].op != "get_attr" or node.args[0].target in sites:
                continue
            weight = attr_tensor(gm, node.args[0].target)
            if isinstance(weight, torch.Tensor) and weight.dim() == 2:
                fqn = fx_fqn(node, node.args[0].target)
                sites[node.args[0].target] = WeightSite(
                    fqn, "embedding", tuple(weight.shape), handle=weight, node=node
                )
        return list(sites.values())
    for node in model.model.graph.all_nodes():
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx"):
            continue
        table = node.inputs[0]
        axis = node.attributes.get("axis")
        if axis is not None and axis.as_int() != 0:
            continue
        if table is None or not table.is_initializer() or table.const_value is None:
            continue
        if len(table.const_value.shape) != 2 or table.dtype != ir.DataType.FLOAT:
            continue
        if table not in sites:
            fqn = _scope_fqn(node) or (table.name or node.name).removesuffix(".weight")
            shape = tuple(table.const_value.shape.numpy())
            sites[table] = WeightSite(fqn, "embedding", shape, handle=(table, False), node=node)
    return list(sites.values())


def read_weight_onnx(site: WeightSite) -> np.ndarray:
    value, transposed = site.handle
    w = value.const_value.numpy()
    return w.T if transposed else w


# ---------------------------------------------------------------- public API
def weight_sites(model) -> list[WeightSite]:
    """All weight sites of an FxModel or OnnxModel, in graph order."""
    return _fx_sites(model) if model.kind == "fx" else _onnx_sites(model)


def read_weight(site: WeightSite) -> torch.Tensor:
    """The site's weight in its (out, in[, k...]) view, as a float tensor (a copy for ONNX)."""
    if isinstance(site.handle, torch.Tensor):
        return site.handle.detach()
    return torch.from_numpy(np.array(read_weight_onnx(site), copy=True))


def write_weight(site: WeightSite, value: torch.Tensor, remake=None) -> None:
    """Write a new (out, in[, k...]) weight. On FX it is copied into the module's parameter
    (every use of a tied parameter sees it); on ONNX it replaces the initializer's data.

    ``remake`` (ONNX): a function returning ``value`` again. The initializer then holds no copy:
    it is an onnx_ir ``LazyTensor`` calling ``remake`` each time it is read (a serialization, an
    onnxruntime session), so a pass that keeps what makes the weight (codes and scales) does not
    also hold it in fp32, and a model whose weights came from external data stays about the size
    of its codes in memory. Without ``remake``, a weight that was read from a file (external
    data, or a weight spilled before) is spilled: written to a scratch file (``spill_file``) and
    read back from it, memory-mapped, when read; so pruning a model larger than memory keeps it
    on disk."""
    if tuple(value.shape) != tuple(site.shape):
        raise ValueError(f"site {site.fqn}: new weight shape {tuple(value.shape)} != {site.shape}")
    if isinstance(site.handle, torch.Tensor):
        with torch.no_grad():
            site.handle.copy_(value)
        return
    old, transposed = site.handle
    dtype = old.const_value.dtype  # from the header: reading the data is not needed for it

    def initializer(v: torch.Tensor) -> ir.Tensor:
        data = v.detach().cpu().numpy().astype(dtype.numpy())
        return ir.tensor(np.ascontiguousarray(data.T if transposed else data), name=old.name)

    if remake is None and isinstance(old.const_value, (ir.ExternalTensor, ir.LazyTensor)):
        remake = _spilled(value)
    if remake is None:
        old.const_value = initializer(value)
    else:
        shape = ir.Shape(old.const_value.shape)
        old.const_value = ir.LazyTensor(
            lambda: initializer(remake()), dtype=dtype, shape=shape, name=old.name
        )
    # a compressed weight sits on its quantization grid / sparsity pattern: rewrites that would
    # fold other factors into it (fuse's affine and linear-chain rules) leave it alone
    old.metadata_props[COMPRESSED] = "true"


def _spilled(value: torch.Tensor):
    """Write ``value`` to a scratch file; return a function reading it back memory-mapped."""
    path, shape = spill_file(), tuple(value.shape)
    value.detach().cpu().numpy().astype(np.float32).tofile(path)  # C order, whatever the strides
    return lambda: torch.from_numpy(np.memmap(path, np.float32, "c", shape=shape))


COMPRESSED = "effc.compressed"
_SCRATCH: list[str] = []
_SPILLED = itertools.count()


def spill_file() -> str:
    """A new file in this process's scratch folder for a spilled weight: under ``EFFC_SCRATCH``
    (or the system's temporary folder), removed when the process exits."""
    if not _SCRATCH:
        folder = tempfile.mkdtemp(prefix="effc-weights-", dir=os.environ.get("EFFC_SCRATCH"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        _SCRATCH.append(folder)
    return os.path.join(_SCRATCH[0], f"{next(_SPILLED)}.f32")


def file_view(site: WeightSite) -> torch.Tensor | None:
    """The site's weight (out, in[, k...]) as a tensor over its external-data file, mapped
    copy-on-write (file pages, not anonymous memory), where an ONNX initializer still reads from
    one in float32; else None."""
    if isinstance(site.handle, torch.Tensor):
        return None
    value, transposed = site.handle
    t = value.const_value
    if not isinstance(t, ir.ExternalTensor) or t.dtype != ir.DataType.FLOAT:
        return None
    shape = tuple(int(d) for d in t.shape)
    array = np.memmap(t.path, dtype=np.float32, mode="c", offset=t.offset or 0, shape=shape)
    w = torch.from_numpy(array)
    return w.T if transposed else w


def untie(model, site: WeightSite) -> bool:
    """Give a tied site (lm_head sharing the embedding) its own copy of the weight, so editing it
    leaves the other use alone. Returns whether it was tied. Collect sites again afterwards."""
    if not site.tied_with:
        return False
    if model.kind == "fx":
        module = model.module.get_submodule(site.fqn)
        module.weight = torch.nn.Parameter(module.weight.detach().clone(), requires_grad=False)
        model.retrace()
    else:
        value, _ = site.handle
        copy = ir.Value(
            name=f"{value.name}.untied.{site.fqn}",
            shape=value.shape,
            type=value.type,
            const_value=ir.tensor(np.array(value.const_value.numpy(), copy=True)),
        )
        model.model.graph.register_initializer(copy)
        weight_input = site.node.inputs[1]
        user = weight_input.producer() if weight_input is not value else site.node
        index = 0 if user is not site.node else 1
        user.replace_input_with(index, copy)
    site.tied_with = []
    return True


def compressible_sites(
    model, skip: list[str], stats: dict, divisor: int, what: str, keep_tied: bool = False
) -> list:
    """Linear weight sites not matched by ``skip`` (FQN substrings), tied ones untied first (and
    listed in ``stats``) unless ``keep_tied`` (then compressing the site compresses the embedding
    it shares its weight with); every input size must be a multiple of ``divisor`` (``what``
    names it)."""

    def linear_sites():
        return [
            s for s in weight_sites(model) if s.op == "linear" and not any(p in s.fqn for p in skip)
        ]

    sites = linear_sites()
    if keep_tied:
        tied = [f"{s.fqn} = {', '.join(s.tied_with)}" for s in sites if s.tied_with]
        if tied:
            stats["kept_tied"] = tied
    untied = [] if keep_tied else [s.fqn for s in sites if untie(model, s)]
    if untied:
        stats["untied"] = untied
        sites = linear_sites()
    bad = [s.fqn for s in sites if s.in_features % divisor]
    if bad:
        raise UnsupportedError(
            f"{what} does not divide the input size of {bad[0]} ({len(bad)} layers)"
        )
    return sites
