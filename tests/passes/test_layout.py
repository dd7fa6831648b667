"""fuse rule layout-chains: structure, op counts, and bit-identical outputs."""

import numpy as np
import pytest
import torch
from _helpers import from_text, op_types, run_pass

import effc
from effc.ir.model import FxModel, OnnxModel

HEADER = '<ir_version: 8, opset_import: ["" : 17]>'


def test_inverse_transposes_cancel():
    model = from_text(
        HEADER
        + """
        g (float[2,3,4,5] x) => (float[2,3,4,5] y) {
            a = Transpose<perm = [0, 2, 3, 1]>(x)
            b = Transpose<perm = [0, 3, 1, 2]>(a)
            y = Relu(b)
        }"""
    )
    new, record, cmp = run_pass("fuse{rules=[layout-chains]}", model)
    assert op_types(new) == ["Relu"]
    assert record.stats == {"layout-chains": 1} and cmp["identical"]


def test_reshape_chain_becomes_one_reshape_and_transposes_compose():
    model = from_text(
        HEADER
        + """
        g (float[2,3,4,5] x) => (float[6,20] y, float[3,2,5,4] z) {
            s1 = Constant<value = int64[3] {6, 4, 5}>()
            s2 = Constant<value = int64[2] {6, 20}>()
            a = Reshape(x, s1)
            b = Reshape(a, s2)
            y = Relu(b)
            t = Transpose<perm = [1, 0, 2, 3]>(x)
            u = Transpose<perm = [0, 1, 3, 2]>(t)
            z = Relu(u)
        }"""
    )
    new, record, cmp = run_pass("fuse{rules=[layout-chains]}", model)
    ops = op_types(new)
    assert ops.count("Reshape") == 1 and ops.count("Transpose") == 1
    perm = next(n for n in new.model.graph if n.op_type == "Transpose").attributes["perm"].value
    assert list(perm) == [1, 0, 3, 2]
    assert record.stats == {"layout-chains": 2} and cmp["identical"]


def test_a_partition_alone_is_kept():
    """A patch partition is neither the identity, a reshape nor one transpose: untouched."""
    model = from_text(
        HEADER
        + """
        g (float[1,2,8,8] x) => (float[4,2,4,4] y) {
            s1 = Constant<value = int64[6] {1, 2, 2, 4, 2, 4}>()
            s2 = Constant<value = int64[4] {4, 2, 4, 4}>()
            a = Reshape(x, s1)
            b = Transpose<perm = [0, 2, 4, 1, 3, 5]>(a)
            c = Reshape(b, s2)
            y = Relu(c)
        }"""
    )
    new, record, _ = run_pass("fuse{rules=[layout-chains]}", model)
    assert op_types(new) == op_types(model) and record.stats == {"layout-chains": 0}


def _ditn(unfold: str):
    from effc.models.ditn import DITN, DITNConfig

    torch.manual_seed(0)
    return DITN(DITNConfig(unfold=unfold)).eval()


@pytest.mark.parametrize("legacy", [False, True])
def test_per_layer_unfold_becomes_unfold_once_on_onnx(legacy):
    from effc.ir.torch_io import export_onnx

    once, per_layer = _ditn("once"), _ditn("per-layer")
    x = once.example_inputs(size=16)
    text = "fixpoint(cleanup,fuse{rules=[layout-chains]})"
    target = effc.Pipeline.from_text(text).run(OnnxModel(export_onnx(once, x, legacy=legacy)))
    model = OnnxModel(export_onnx(per_layer, x, legacy=legacy))
    before = model.run({"x": x["x"].numpy()})
    layout = {"Reshape", "Transpose"}
    n_before = sum(op in layout for op in op_types(model))
    result = effc.Pipeline.from_text(text).run(model)
    after = result.model.run({"x": x["x"].numpy()})
    counts = [
        sorted(op for op in op_types(m) if op in layout) for m in (result.model, target.model)
    ]
    assert counts[0] == counts[1]  # the per-layer export now has the published form's layout ops
    assert sum(op in layout for op in op_types(result.model)) < n_before
    assert np.array_equal(before[0], after[0])  # a pure rewrite: bit-identical


def test_per_layer_unfold_on_fx_is_bit_identical():
    model = _ditn("per-layer")
    x = model.example_inputs(size=16)
    fx = FxModel(model, x)
    before = fx.op_histogram()
    result = effc.Pipeline.from_text("fuse{rules=[layout-chains]}").run(fx)
    after = result.model.op_histogram()
    assert result.report.records[0].stats["layout-chains"] == 1
    assert after["aten::permute.default"] == before["aten::permute.default"] - 2
    with torch.no_grad():
        expected = model(**x).numpy()
    assert np.array_equal(result.model.run({"x": x["x"].numpy()})[0], expected)


@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_flatten_axes_follow_onnx(axis):
    """Flatten's axis may equal the rank ((1, 32) -> (32, 1) at axis 2): that Flatten is kept,
    one that keeps the shape is removed, and a Flatten that its Reshape undoes cancels."""
    out = {0: "1,32", 1: "1,32", 2: "32,1", -1: "1,32"}[axis]
    model = from_text(
        HEADER
        + f"""
        g (float[1,32] x) => (float[{out}] y, float[1,32] z) {{
            f = Flatten<axis = {axis}>(x)
            y = Relu(f)
            s = Constant<value = int64[2] {{1, 32}}>()
            r = Reshape(f, s)
            z = Relu(r)
        }}"""
    )
    new, record, cmp = run_pass("fuse{rules=[layout-chains]}", model)
    moves = axis == 2
    assert op_types(new).count("Flatten") == int(moves) and "Reshape" not in op_types(new)
    assert record.stats == {"layout-chains": 1 if moves else 2} and cmp["identical"]


@pytest.mark.parametrize("legacy", [False, True])
def test_swin_style_residuals_hoist_to_unfold_once(legacy):
    """unfold="per-op" partitions and reverses around every attention and FFN, with the residual
    adds on the image; unfold-once + layout-chains leave the layout ops of the published form."""
    from effc.ir.torch_io import export_onnx

    once, per_op = _ditn("once"), _ditn("per-op")
    x = once.example_inputs(size=16)
    with torch.no_grad():
        assert torch.allclose(once(**x), per_op(**x), atol=1e-5)
    text = "fixpoint(cleanup,fuse{rules=[unfold-once,layout-chains]})"
    target = effc.Pipeline.from_text(text).run(OnnxModel(export_onnx(once, x, legacy=legacy)))
    model = OnnxModel(export_onnx(per_op, x, legacy=legacy))
    before = model.run({"x": x["x"].numpy()})
    result = effc.Pipeline.from_text(text).run(model)
    layout = {"Reshape", "Transpose"}
    counts = [
        sorted(op for op in op_types(m) if op in layout) for m in (result.model, target.model)
    ]
    assert counts[0] == counts[1]
    fired = sum(r.stats.get("unfold-once", 0) for r in result.report.records if r.name == "fuse")
    assert fired == 4  # 2 ITLs x (attention + FFN) residual adds
    after = result.model.run({"x": x["x"].numpy()})
    np.testing.assert_allclose(after[0], before[0], rtol=1e-5, atol=1e-6)
