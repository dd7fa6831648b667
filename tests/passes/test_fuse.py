import numpy as np
import pytest
from _helpers import from_text, op_types, rng_array, run_pass

import effc
from effc.ir.model import FxModel

HEADER = '<ir_version: 8, opset_import: ["" : 17]>'


def _conv_bn(bias: bool):
    inits = {
        "W": rng_array(8, 4, 3, 3, seed=1, scale=0.2),
        "scale": rng_array(8, seed=2, positive=True),
        "beta": rng_array(8, seed=3),
        "mean": rng_array(8, seed=4, scale=0.1),
        "var": rng_array(8, seed=5, positive=True),
    }
    conv_inputs = "x, W, B" if bias else "x, W"
    if bias:
        inits["B"] = rng_array(8, seed=6)
    return from_text(
        HEADER
        + f"""
        g (float[2,4,10,10] x) => (float[2,8,10,10] y) {{
            c = Conv<pads = [1, 1, 1, 1]>({conv_inputs})
            y = BatchNormalization<epsilon = 0.001>(c, scale, beta, mean, var)
        }}""",
        inits,
    )


@pytest.mark.parametrize("bias", [False, True])
def test_conv_batchnorm_folds_on_onnx(bias):
    model = _conv_bn(bias)
    new, record, cmp = run_pass("fuse{rules=[batchnorm]}", model)
    assert op_types(new) == ["Conv"]
    assert record.stats == {"batchnorm": 1}
    assert len(new.model.graph.initializers) == 2  # folded weight and bias; BN params gone
    assert cmp["ok"] and cmp["max_abs"] < 1e-5


def test_conv_batchnorm_folds_on_fx(tiny_cnn):
    result = effc.Pipeline.from_text("fuse", instruments=[effc.VerifyInstrument()]).run(
        FxModel(tiny_cnn, tiny_cnn.example_inputs())
    )
    record = result.report.records[0]
    assert record.stats["batchnorm"] == 5
    assert record.ops_before["aten::batch_norm.default"] == 5
    assert "aten::batch_norm.default" not in record.ops_after
    assert record.error["ok"] and record.error["max_abs"] < 1e-5
    # the source module is untouched: folding is structural, on the graph
    assert any(isinstance(m, __import__("torch").nn.BatchNorm2d) for m in tiny_cnn.modules())


def test_conv_with_two_users_is_not_folded():
    model = _conv_bn(False)
    graph = model.model.graph
    conv = next(n for n in graph if n.op_type == "Conv")
    import onnx_ir as ir

    extra = ir.node("Relu", [conv.outputs[0]])
    graph.append(extra)
    graph.outputs.append(extra.outputs[0])
    extra.outputs[0].name = "r"
    extra.outputs[0].shape = conv.outputs[0].shape
    extra.outputs[0].dtype = ir.DataType.FLOAT
    _, record, _ = run_pass("fuse{rules=[batchnorm]}", model)
    assert record.stats == {"batchnorm": 0}


def _matmul_add(x_shape, bias_shape, commute=False):
    n = 3
    add = "Add(b, m)" if commute else "Add(m, b)"
    x_dims = ",".join(map(str, x_shape))
    out_shape = list(np.broadcast_shapes(tuple(x_shape[:-1]) + (n,), tuple(bias_shape)))
    return from_text(
        HEADER
        + f"""
        g (float[{x_dims}] x) => (float[{",".join(map(str, out_shape))}] y) {{
            m = MatMul(x, W)
            y = {add}
        }}""",
        {"W": rng_array(x_shape[-1], n, seed=1), "b": rng_array(*bias_shape, seed=2)},
    )


@pytest.mark.parametrize(
    "x_shape, bias_shape, commute",
    [
        ([4, 8], [3], False),
        ([4, 8], [4, 1], False),
        ([4, 8], [4, 3], False),
        ([4, 8], [3], True),
        ([4, 8], [1, 1], False),
    ],
)
def test_matmul_add_becomes_gemm_where_legal(x_shape, bias_shape, commute):
    new, record, cmp = run_pass(
        "fuse{rules=[matmul-add]}", _matmul_add(x_shape, bias_shape, commute)
    )
    assert op_types(new) == ["Gemm"] and record.stats == {"matmul-add": 1}
    assert cmp["ok"]


@pytest.mark.parametrize(
    "x_shape, bias_shape",
    [([2, 4, 8], [3]), ([4, 8], [1, 4, 3]), ([4, 8], [5, 4, 3])],
)
def test_matmul_add_stays_where_gemm_would_be_illegal(x_shape, bias_shape):
    new, record, cmp = run_pass("fuse{rules=[matmul-add]}", _matmul_add(x_shape, bias_shape))
    assert op_types(new) == ["MatMul", "Add"] and record.stats == {"matmul-add": 0}
    assert cmp["identical"]


def test_rules_that_do_not_apply_to_the_ir_say_so(tiny_cnn):
    record = effc.Pipeline.from_text("fuse{rules=[matmul-add]}").run(tiny_cnn).report.records[0]
    assert record.stats == {"matmul-add": "n/a on fx"} and not record.modified
