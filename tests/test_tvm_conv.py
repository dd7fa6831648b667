"""effc's direct conv kernel for the tvm target (backends/tvm_conv.py): exact against torch on
depthwise and dense KxK convs of odd shapes (strides 1-2, kernels 3/5, maps narrower than a
vector, borders only one column wide), with the fused bias and clamp; a wrong kernel is caught;
the rewrite picks the convs it can run and leaves the rest; a whole build with the kernel matches
onnxruntime. Marker ``tvm``."""

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from effc.backends import tvm as tvm_backend
from effc.backends import tvm_conv, tvm_sparse
from effc.backends.onnxruntime import run_file
from effc.compile import compile_model

TUNING = Path(__file__).parents[1] / "tools/bench/results/tvm_tuning/mobilenet-v2"

pytestmark = [
    pytest.mark.tvm,
    pytest.mark.skipif(importlib.util.find_spec("tvm") is None, reason="apache-tvm not installed"),
]


def _run_kernel(x, w, b, s, p, groups, lanes, lo=-math.inf, hi=math.inf, res=None):
    import tvm

    n, c, h, wd = x.shape
    o, k = w.shape[0], w.shape[2]
    fused = res is not None
    kernel = tvm_conv.conv_nchw(n, c, h, wd, o, k, s, p, groups, lanes, lo, hi, fused)
    lib = tvm.compile(tvm.IRModule({"main": kernel}), target=tvm_backend.target_for("x86"))
    oh, ow = (h + 2 * p - k) // s + 1, (wd + 2 * p - k) // s + 1
    res = res if fused else np.zeros(1, np.float32)
    args = [tvm.runtime.tensor(a) for a in (x, w, b, res)]
    args.append(tvm.runtime.tensor(np.full((n, o, oh, ow), np.nan, np.float32)))
    lib["main"](*args)
    return args[-1].numpy()


def _reference(x, w, b, s, p, groups, lo=-math.inf, hi=math.inf):
    t = torch.nn.functional.conv2d(
        torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b), s, p, groups=groups
    )
    return t.clamp(lo, hi).numpy()


CASES = [  # (n, c, o, h, w, k, stride, padding, groups)
    (1, 8, 8, 9, 13, 3, 1, 1, 8),  # depthwise, odd map
    (2, 6, 6, 12, 11, 3, 2, 1, 6),  # depthwise stride 2, batch 2, odd width
    (1, 4, 4, 7, 7, 5, 1, 2, 4),  # depthwise 5x5, interior narrower than a vector
    (1, 5, 5, 4, 4, 3, 1, 0, 5),  # no padding, two output columns
    (1, 3, 16, 10, 10, 3, 2, 1, 1),  # a stem: dense 3x3 stride 2, R = 8
    (1, 4, 6, 8, 9, 3, 1, 1, 1),  # dense, 6 outputs (R = 2)
    (1, 3, 5, 6, 33, 3, 1, 1, 1),  # dense, 5 outputs (R = 1), wide row: several tiles
]


@pytest.mark.parametrize("lanes", [16, 4])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_conv_kernel_is_exact_on_odd_shapes(case, lanes):
    n, c, o, h, w, k, s, p, groups = case
    rng = np.random.default_rng(sum(case))
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    wt = rng.standard_normal((o, c // groups, k, k)).astype(np.float32)
    b = rng.standard_normal(o).astype(np.float32)
    got = _run_kernel(x, wt, b, s, p, groups, lanes)
    np.testing.assert_allclose(got, _reference(x, wt, b, s, p, groups), rtol=1e-5, atol=1e-5)
    clamped = _run_kernel(x, wt, b, s, p, groups, lanes, 0.0, 6.0)  # ReLU6 fused
    want = _reference(x, wt, b, s, p, groups, 0.0, 6.0)
    np.testing.assert_allclose(clamped, want, rtol=1e-5, atol=1e-5)
    res = rng.standard_normal(want.shape).astype(np.float32)  # a residual, then ReLU
    got = _run_kernel(x, wt, b, s, p, groups, lanes, 0.0, math.inf, res)
    want = np.maximum(_reference(x, wt, b, s, p, groups) + res, 0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_a_wrong_kernel_is_caught():
    """The comparison above fails for a kernel whose taps land one column off (weights rolled
    by one column): the check is not vacuous."""
    n, c, o, h, w, k, s, p, groups = CASES[0]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    wt = rng.standard_normal((o, 1, k, k)).astype(np.float32)
    b = np.zeros(o, np.float32)
    got = _run_kernel(x, np.roll(wt, 1, axis=3), b, s, p, groups, 16)
    assert not np.allclose(got, _reference(x, wt, b, s, p, groups), atol=1e-3)


class _Net(nn.Module):
    """A stem, a depthwise conv with ReLU6, a dilated depthwise conv (not the kernel's), a 1x1
    conv and a grouped conv with two channels per group (not the kernel's)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 2, 1)
        self.dw = nn.Conv2d(8, 8, 3, 1, 1, groups=8)
        self.dilated = nn.Conv2d(8, 8, 3, 1, 2, dilation=2, groups=8)
        self.pw = nn.Conv2d(8, 16, 1)
        self.grouped = nn.Conv2d(16, 16, 3, 1, 1, groups=8)

    def example_inputs(self):
        return {"pixels": torch.randn(1, 3, 30, 30)}

    def forward(self, pixels):
        y = torch.relu(self.stem(pixels))
        y = torch.clamp(self.dw(y), 0, 6)
        return self.grouped(self.pw(self.dilated(y)))


def test_rewrite_takes_the_convs_it_runs_and_the_build_matches_onnxruntime(tmp_path):
    torch.manual_seed(0)
    model = _Net().eval()
    x = {"pixels": np.random.default_rng(1).standard_normal((1, 3, 30, 30), np.float32)}
    everywhere = tmp_path / "kernel"
    compile_model(
        model,
        "cleanup",
        everywhere,
        target="tvm",
        backend_options={"kernel_everywhere": True},
        verify=False,
    )
    import json

    meta = json.loads((everywhere / "tvm.json").read_text())
    convs = meta["conv_layers"]
    # the stem and the plain depthwise conv; the dilated and the grouped ones stay TVM's
    assert [(c["shape"][0], c["groups"], c["stride"]) for c in convs] == [(8, 1, 2), (8, 8, 1)]
    assert all(c["choice"] == "kernel" for c in convs)
    got = next(iter(tvm_backend.run(everywhere, x).values()))
    want = next(iter(run_file(everywhere / "model.onnx", x).values()))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    notes = tvm_backend.describe(everywhere)
    assert any("2 of 2 candidates run by effc's kernel" in n for n in notes)


def test_pinned_dense_keeps_tvms_operator(tmp_path):
    import json

    torch.manual_seed(0)
    model = _Net().eval()
    first = tmp_path / "first"
    compile_model(
        model,
        "cleanup",
        first,
        target="tvm",
        backend_options={"kernel_everywhere": True},
        verify=False,
    )
    keys = [c["key"] for c in json.loads((first / "tvm.json").read_text())["conv_layers"]]
    pinned = tmp_path / "pinned.json"
    pinned.write_text(json.dumps({"layers": {keys[0]: "dense", keys[1]: "kernel"}}))
    out = tmp_path / "out"
    compile_model(
        model,
        "cleanup",
        out,
        target="tvm",
        backend_options={"decisions": str(pinned)},
        verify=False,
    )
    convs = json.loads((out / "tvm.json").read_text())["conv_layers"]
    assert [c["choice"] for c in convs] == ["dense", "kernel"]
    assert all(c["why"] == "decision file" for c in convs)
    x = {"pixels": np.random.default_rng(2).standard_normal((1, 3, 30, 30), np.float32)}
    got = next(iter(tvm_backend.run(out, x).values()))
    want = next(iter(run_file(out / "model.onnx", x).values()))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    with pytest.raises(Exception, match="choices must be sparse, kernel or dense"):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({"layers": {keys[0]: "fast"}}))
        tvm_sparse.load_decisions(bad)


def test_measured_layers_are_the_tuning_databases_workloads():
    """The per-layer dense modules (conv + bias + clamp bounds as 0-d inputs, or + a residual in
    the model's operand order) are the fused workloads of the committed MobileNetV2 tuning
    database, so the build compares its kernels with TVM's tuned operators."""
    import tvm

    db = tvm_backend.load_database(TUNING)
    target = tvm_backend.target_for("x86")
    six = tvm_sparse.Epilogue(end=None, bias=np.ones(144, np.float32), lo=0.0, hi=6.0)
    depthwise, _ = tvm_conv.conv_module(
        np.ones((144, 1, 3, 3), np.float32), 1, 56, 56, 1, 1, 144, six
    )
    res = tvm_sparse.Epilogue(end=None, bias=np.ones(24, np.float32), residual=object())
    res.residual_first = True  # torchvision's x + conv(x)
    project, _ = tvm_sparse.pointwise_module(np.ones((24, 144), np.float32), 1, 144, 3136, res)
    res.residual_first = False
    swapped, _ = tvm_sparse.pointwise_module(np.ones((24, 144), np.float32), 1, 144, 3136, res)

    def covered(mod):
        funcs = tvm_backend.fused(mod, target).functions.items()
        prim = [f for gv, f in funcs if isinstance(f, tvm.tirx.PrimFunc)]
        return [
            db.has_workload(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}))
            for f in prim
        ]

    assert covered(depthwise) == [True]
    assert covered(project) == [True]
    assert covered(swapped) == [False]  # the check can fail: another form is another workload
