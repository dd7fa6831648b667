"""tvm-legalize without TVM: the Resize rewrite keeps the graph valid for its opset (roi and
scales are required inputs before opset 13, so an empty one stays a constant there)."""

from __future__ import annotations

import numpy as np
import pytest
from _helpers import from_text

import effc
from effc.backends.onnxruntime import run_file
from effc.ir.onnx_io import save_onnx


@pytest.mark.parametrize("opset,rewritten", [(11, 0), (13, 1)])
def test_resize_inputs_are_dropped_only_where_the_opset_allows(tmp_path, opset, rewritten):
    model = from_text(
        f"""
        <ir_version: 7, opset_import: ["" : {opset}]>
        g (float[1, 3, 8, 8] x) => (float[1, 3, 16, 16] y) {{
            roi = Constant <value = float[0] {{}}> ()
            scales = Constant <value = float[4] {{1.0, 1.0, 2.0, 2.0}}> ()
            y = Resize <mode = "nearest"> (x, roi, scales)
        }}
        """
    )
    save_onnx(model.model, tmp_path / "in.onnx")
    result = effc.Pipeline.from_text("tvm-legalize").run(str(tmp_path / "in.onnx"))
    assert result.report.records[0].stats["resize_rewritten"] == rewritten
    save_onnx(result.model.model, tmp_path / "out.onnx")
    x = {"x": np.random.default_rng(0).standard_normal((1, 3, 8, 8), np.float32)}
    got = run_file(tmp_path / "out.onnx", x)  # onnxruntime loads it: a valid graph
    want = run_file(tmp_path / "in.onnx", x)
    np.testing.assert_array_equal(next(iter(got.values())), next(iter(want.values())))
