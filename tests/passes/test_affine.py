"""fuse rules affine and linear-chain: what folds, what must not, and the numerics."""

import numpy as np
import pytest
from _helpers import from_text, op_types, rng_array, run_pass

HEADER = '<ir_version: 8, opset_import: ["" : 17]>'


def _model(body: str, inputs: str, outputs: str, inits: dict):
    return from_text(HEADER + f"\n g ({inputs}) => ({outputs}) {{\n{body}\n}}", inits)


def test_per_channel_scale_and_bias_after_conv_fold_into_it():
    inits = {
        "W": rng_array(8, 4, 3, 3, seed=1),
        "B": rng_array(8, seed=2),
        "s": rng_array(1, 8, 1, 1, seed=3),
        "c": rng_array(8, 1, 1, seed=4),
    }
    model = _model(
        "a = Conv<pads = [1, 1, 1, 1]>(x, W, B)\n b = Mul(a, s)\n y = Add(b, c)",
        "float[2,4,6,6] x",
        "float[2,8,6,6] y",
        inits,
    )
    new, record, cmp = run_pass("fixpoint(fuse{rules=[affine]})", model)
    assert op_types(new) == ["Conv"] and cmp["ok"] and cmp["max_abs"] < 1e-4


@pytest.mark.parametrize("group", [1, 4])
def test_input_scale_folds_into_a_padded_conv_and_offset_only_without_padding(group):
    cin = 4
    inits = {
        "W": rng_array(8, cin // group, 3, 3, seed=1),
        "W1": rng_array(8, cin // group, 1, 1, seed=5),
        "s": rng_array(1, cin, 1, 1, seed=3),
        "c": rng_array(cin, 1, 1, seed=4),
    }
    model = _model(
        f"a = Mul(x, s)\n y = Conv<pads = [1, 1, 1, 1], group = {group}>(a, W)\n"
        f" b = Add(x, c)\n z = Conv<pads = [1, 1, 1, 1], group = {group}>(b, W)\n"
        f" d = Add(x, c)\n u = Conv<group = {group}>(d, W1)",
        "float[2,4,6,6] x",
        "float[2,8,6,6] y, float[2,8,6,6] z, float[2,8,6,6] u",
        inits,
    )
    new, record, cmp = run_pass("fuse{rules=[affine]}", model)
    # the scale folds; the offset before the padded conv must stay (the border would change);
    # the offset before the unpadded 1x1 conv folds into its bias
    assert op_types(new).count("Mul") == 0 and op_types(new).count("Add") == 1
    assert record.stats == {"affine": 2} and cmp["ok"] and cmp["max_abs"] < 1e-4


def test_matmul_scales_fold_and_constants_merge():
    inits = {
        "W": rng_array(16, 8, seed=1),
        "s_in": rng_array(16, seed=2),
        "s_out": rng_array(8, seed=3),
        "a": rng_array(16, seed=4),
        "b": rng_array(16, seed=5),
    }
    model = _model(
        "m = Mul(x, a)\n n = Mul(m, b)\n y = Relu(n)\n"
        "p = Mul(x, s_in)\n q = MatMul(p, W)\n z = Mul(q, s_out)",
        "float[3,5,16] x",
        "float[3,5,16] y, float[3,5,8] z",
        inits,
    )
    new, record, cmp = run_pass("fixpoint(fuse{rules=[affine]})", model)
    assert sorted(op_types(new)) == ["MatMul", "Mul", "Relu"]
    assert cmp["ok"] and cmp["max_abs"] < 1e-4


def test_a_constant_that_broadcasts_to_a_higher_rank_is_not_folded():
    model = _model(
        "a = Mul(x, s)\n y = MatMul(a, W)",
        "float[5,16] x",
        "float[2,5,8] y",
        {"W": rng_array(16, 8, seed=1), "s": rng_array(2, 1, 16, seed=2)},
    )
    new, record, _ = run_pass("fuse{rules=[affine]}", model)
    assert op_types(new) == ["Mul", "MatMul"] and record.stats == {"affine": 0}


def test_shared_activation_is_not_folded():
    model = _model(
        "a = Mul(x, s)\n y = MatMul(a, W)\n z = Relu(a)",
        "float[5,16] x",
        "float[5,8] y, float[5,16] z",
        {"W": rng_array(16, 8, seed=1), "s": rng_array(16, seed=2)},
    )
    _, record, _ = run_pass("fuse{rules=[affine]}", model)
    assert record.stats == {"affine": 0}


def test_consecutive_pointwise_convs_become_one():
    inits = {
        "W1": rng_array(16, 8, 1, 1, seed=1),
        "B1": rng_array(16, seed=2),
        "W2": rng_array(12, 16, 1, 1, seed=3),
        "B2": rng_array(12, seed=4),
    }
    model = _model(
        "a = Conv(x, W1, B1)\n y = Conv(a, W2, B2)", "float[2,8,5,5] x", "float[2,12,5,5] y", inits
    )
    new, record, cmp = run_pass("fuse{rules=[linear-chain]}", model)
    assert op_types(new) == ["Conv"] and record.stats == {"linear-chain": 1}
    assert cmp["ok"] and cmp["max_abs"] < 1e-4


def test_a_bottleneck_is_not_folded_and_matmul_chains_are():
    model = _model(
        "a = Conv(x, W1)\n y = Conv(a, W2)\n m = MatMul(v, A)\n z = MatMul(m, B)",
        "float[2,16,5,5] x, float[4,16] v",
        "float[2,16,5,5] y, float[4,24] z",
        {
            "W1": rng_array(2, 16, 1, 1, seed=1),  # 16 -> 2 -> 16: folding would add FLOPs
            "W2": rng_array(16, 2, 1, 1, seed=2),
            "A": rng_array(16, 32, seed=3),
            "B": rng_array(32, 24, seed=4),
        },
    )
    new, record, cmp = run_pass("fuse{rules=[linear-chain]}", model)
    assert op_types(new).count("Conv") == 2 and op_types(new).count("MatMul") == 1
    assert record.stats == {"linear-chain": 1} and cmp["ok"]


def test_ditn_tanh_norms_fold_into_the_next_pointwise_conv():
    """The deployment form (tanh + 1x1 conv) followed by qkv / FFN 1x1 convs: one conv each."""
    import torch

    from effc.ir.model import OnnxModel
    from effc.ir.torch_io import export_onnx
    from effc.models.ditn import DITN, DITNConfig

    torch.manual_seed(0)
    model = DITN(DITNConfig(norm="tanh")).eval()
    x = model.example_inputs(size=16)
    onnx_model = OnnxModel(export_onnx(model, x))
    ref = onnx_model.run({"x": x["x"].numpy()})[0]
    new, record, _ = run_pass("fuse{rules=[linear-chain]}", onnx_model)
    assert record.stats == {"linear-chain": 5}  # 2 ITLs x 2 norms + the SAL's FFN norm
    np.testing.assert_allclose(new.run({"x": x["x"].numpy()})[0], ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cut", ["split", "slices"])
def test_channel_cuts_of_convs_become_one_conv_per_part(cut):
    inits = {
        "W1": rng_array(12, 4, 1, 1, seed=1),
        "B1": rng_array(12, seed=2),
        "Wd": rng_array(12, 1, 3, 3, seed=3),
        "Bd": rng_array(12, seed=4),
    }
    if cut == "split":
        body = "q, k, v = Split<axis = 1>(d, sizes)"
        inits["sizes"] = np.array([4, 4, 4], dtype=np.int64)
    else:
        body = "\n".join(f"{n} = Slice(d, s{i}, e{i}, ax)" for i, n in enumerate(("q", "k", "v")))
        for i in range(3):
            inits[f"s{i}"] = np.array([4 * i], dtype=np.int64)
            inits[f"e{i}"] = np.array([4 * i + 4], dtype=np.int64)
        inits["ax"] = np.array([1], dtype=np.int64)
    model = _model(
        "a = Conv(x, W1, B1)\n d = Conv<pads = [1, 1, 1, 1], group = 12>(a, Wd, Bd)\n"
        + body
        + "\n y = Add(q, k)\n z = Mul(y, v)",
        "float[2,4,6,6] x",
        "float[2,4,6,6] z",
        inits,
    )
    new, record, cmp = run_pass("fixpoint(fuse{rules=[split-conv]})", model)
    ops = op_types(new)
    assert ops.count("Conv") == 6 and "Split" not in ops
    assert ops.count("Slice") == 0  # the cut moved up through the depthwise conv, then vanished
    assert cmp["ok"] and cmp["max_abs"] < 1e-4


def test_fx_rules_fold_the_same_patterns():
    """affine and linear-chain on FX graphs: conv * s + b, scale before a linear, offset before
    an unpadded 1x1 conv, and the tanh-norm 1x1 convs of DITN; outputs unchanged."""
    import torch

    import effc
    from effc.ir.model import FxModel
    from effc.models.ditn import DITN, DITNConfig

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 8, 3, padding=1)
            self.s = torch.nn.Parameter(torch.randn(8, 1, 1))
            self.b = torch.nn.Parameter(torch.randn(8, 1, 1))
            self.fc = torch.nn.Linear(8, 6)
            self.k = torch.nn.Parameter(torch.randn(8))
            self.pw = torch.nn.Conv2d(4, 5, 1)
            self.t = torch.nn.Parameter(torch.randn(4, 1, 1))

        def forward(self, x):
            y = self.conv(x) * self.s + self.b
            z = self.fc(y.mean((2, 3)) * self.k) * 2.0
            return y, z, self.pw(x + self.t)

    torch.manual_seed(0)
    for module, x, text, expected in (
        (Toy().eval(), {"x": torch.randn(2, 4, 6, 6)}, "fixpoint(fuse{rules=[affine]})", 5),
        (
            DITN(DITNConfig(norm="tanh")).eval(),
            {"x": torch.rand(1, 3, 16, 16)},
            "fuse{rules=[linear-chain]}",
            5,
        ),
    ):
        fx = FxModel(module, x)
        convs = fx.op_histogram().get("aten::conv2d.default", 0)
        result = effc.Pipeline.from_text(text).run(fx)
        fired = sum(r.stats[next(iter(r.stats))] for r in result.report.records)
        assert fired == expected
        with torch.no_grad():
            refs = module(**x)
        refs = refs if isinstance(refs, tuple) else (refs,)
        outs = result.model.run({"x": x["x"].numpy()})
        for got, ref in zip(outs, refs):
            np.testing.assert_allclose(got, ref.numpy(), rtol=1e-4, atol=1e-5)
    ops = result.model.op_histogram()
    assert ops["aten::conv2d.default"] == convs - 5  # 5 norm convs merged into their consumers


def test_matmul_chain_folds_through_a_reshape_of_the_leading_dims():
    model = _model(
        "a = MatMul(x, A)\n s = Constant<value = int64[2] {6, 32}>()\n r = Reshape(a, s)\n"
        " y = MatMul(r, B)\n"
        " t = Constant<value = int64[2] {3, 64}>()\n q = Reshape(a, t)\n z = Relu(q)",
        "float[2,3,16] x",
        "float[6,24] y, float[3,64] z",
        {"A": rng_array(16, 32, seed=1), "B": rng_array(32, 24, seed=2)},
    )
    # y's reshape keeps the last dim: folds; a also feeds z (not single use): nothing folds
    _, record, _ = run_pass("fuse{rules=[linear-chain]}", model)
    assert record.stats == {"linear-chain": 0}
    model = _model(
        "a = MatMul(x, A)\n s = Constant<value = int64[2] {6, 32}>()\n r = Reshape(a, s)\n"
        " y = MatMul(r, B)",
        "float[2,3,16] x",
        "float[6,24] y",
        {"A": rng_array(16, 32, seed=1), "B": rng_array(32, 24, seed=2)},
    )
    new, record, cmp = run_pass("fuse{rules=[linear-chain]}", model)
    assert op_types(new) == ["Reshape", "MatMul"] and record.stats == {"linear-chain": 1}
    assert cmp["ok"] and cmp["max_abs"] < 1e-4
    model = _model(  # a reshape that moves the last dim is not a regrouping: kept
        "a = MatMul(x, A)\n s = Constant<value = int64[2] {12, 16}>()\n r = Reshape(a, s)\n"
        " y = MatMul(r, B)",
        "float[2,3,32] x",
        "float[12,24] y",
        {"A": rng_array(32, 32, seed=1), "B": rng_array(16, 24, seed=2)},
    )
    _, record, _ = run_pass("fuse{rules=[linear-chain]}", model)
    assert record.stats == {"linear-chain": 0}
