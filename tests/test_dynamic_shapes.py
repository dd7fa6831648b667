"""Files with symbolic, -1 and unnamed dims, and no value_info, as other exporters write them:
effc takes them without --shape, keeps the dims dynamic, and says which sizes it checked at."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from effc.inputs import parse_shapes, resolve_shape
from effc.ir.model import InputSpec


def _conv_file(path, dims, opset=13):
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8, None, None])
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "W"),
        numpy_helper.from_array((rng.random((1, 8, 1, 1)) + 0.5).astype(np.float32), "s"),
        numpy_helper.from_array(rng.standard_normal((8, 8, 1, 1)).astype(np.float32), "W2"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["a"], pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["a", "s"], ["b"]),
        helper.make_node("Relu", ["b"], ["c"]),
        helper.make_node("Conv", ["c", "W2"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "g", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def _matmul_file(path):
    """Two MatMuls with initializer weights, written with onnx.helper: no value_info at all."""
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 32])
    inits = [
        numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "W1"),
        numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "W2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "W2"], ["y"]),
    ]
    model = helper.make_model(
        helper.make_graph(nodes, "g", [x], [y], inits),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    onnx.save(model, path)
    return path


def _dims(path, which="input"):
    m = onnx.load(str(path))
    values = m.graph.input if which == "input" else m.graph.output
    return [d.dim_param or d.dim_value or None for d in values[0].type.tensor_type.shape.dim]


@pytest.mark.parametrize("dims", [["batch", 3, "h", "w"], [-1, 3, None, None]])
@pytest.mark.parametrize(
    "passes", ["fixpoint(cleanup,fuse)", "layernorm", "cleanup,layernorm{form=conv}"]
)
def test_dynamic_files_compile_without_shape_and_stay_dynamic(tmp_path, cli, dims, passes):
    src = _conv_file(tmp_path / "m.onnx", dims)
    code, out, err = cli("compile", src, "--passes", passes, "-o", tmp_path / "o")
    assert code == 0, err
    assert "by the default rule" in err  # the report says which sizes it checked at
    got = _dims(tmp_path / "o" / "model.onnx")
    assert got[1] == 3 and got[0] != 1 and got[2] != 64  # still symbolic
    code, out, err = cli("run", tmp_path / "o", "--shape", "x=2x3x20x24")
    assert code == 0, err


def test_tensorrt_target_keeps_unfixed_dims_and_lists_them(tmp_path, cli):
    src = _conv_file(tmp_path / "m.onnx", ["batch", 3, "h", "w"])
    code, _, err = cli(
        "compile", src, "--passes", "cleanup", "--target", "tensorrt", "-o", tmp_path / "o"
    )
    assert code == 0, err
    report = (tmp_path / "o" / "report.json").read_text()
    assert "dynamic_dims" in report and "x[0]" in report


def test_a_fitting_shape_is_accepted_for_minus_one_and_unnamed_dims(tmp_path, cli):
    src = _conv_file(tmp_path / "m.onnx", [-1, 3, None, None])
    code, _, err = cli(
        "compile", src, "--passes", "cleanup", "--shape", "x=2x3x16x16", "-o", tmp_path / "o"
    )
    assert code == 0, err
    code, _, err = cli(
        "compile", src, "--passes", "cleanup", "--shape", "x=2x4x16x16", "-o", tmp_path / "o2"
    )
    assert code == 2 and "does not fit" in err


def test_shape_rule():
    image = InputSpec("x", [-1, 3, "h", "?"], "float32")
    assert resolve_shape(image, {}) == [1, 3, 64, 64]
    assert resolve_shape(image, parse_shapes(["x=2x3x?x32"])) == [2, 3, 64, 32]
    tokens = InputSpec("input_ids", ["batch", "sequence"], "int64")
    assert resolve_shape(tokens, {}) == [1, 16]


def test_bsr_target_on_a_plain_onnx_file_without_value_info(tmp_path, cli):
    src = _matmul_file(tmp_path / "m.onnx")
    code, _, err = cli(
        "compile",
        src,
        "--passes",
        "group-prune{score=magnitude},quantize{bits=4,group=16},bsr-pack{decide=false}",
        "--target",
        "bsr",
        "-o",
        tmp_path / "o",
    )
    assert code == 0, err
    assert "layers_packed=2" in err
    code, out, err = cli("run", tmp_path / "o", "--shape", "x=3x64")
    assert code == 0, err


def test_external_data_end_to_end_from_another_folder(tmp_path, cli, monkeypatch):
    """Every weight in an external-data file beside the model; effc runs from another working
    directory: verification, the artifact (its own copy of the data, hashed), run and check."""
    import json

    folder = tmp_path / "model"
    folder.mkdir()
    proto = onnx.load(str(_conv_file(tmp_path / "inline.onnx", ["batch", 3, "h", "w"])))
    onnx.save_model(
        proto,
        str(folder / "m.onnx"),
        save_as_external_data=True,
        location="m.weights",
        size_threshold=0,
    )
    assert (
        not onnx.load(str(folder / "m.onnx"), load_external_data=False)
        .graph.initializer[0]
        .raw_data
    )  # really external
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, _, err = cli(
        "compile", folder / "m.onnx", "--passes", "fixpoint(cleanup,fuse)", "-o", tmp_path / "o"
    )
    assert code == 0, err
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert "model.onnx.data" in manifest["files"]
    (folder / "m.weights").rename(folder / "moved")  # the artifact does not read the source's
    code, _, err = cli("run", tmp_path / "o", "--shape", "x=1x3x8x8")
    assert code == 0, err
    (folder / "moved").rename(folder / "m.weights")
    code, out, err = cli("check", folder / "m.onnx", tmp_path / "o" / "model.onnx")
    assert code == 0 and ("equal" in out or "identical" in out), (out, err)


def test_legacy_dynamic_bert_export_sheds_its_shape_chains(tmp_path):
    """A BERT exported by the TorchScript exporter with dynamic batch and sequence (as most
    BERT ONNX files in the wild are): cleanup+fuse fold its Shape/Gather/Concat/Where chains
    (symbolic inference sees that the heads' reshapes keep batch and length), the output stays
    dynamic and equal to the original's at sizes other than the one verification used, and it
    has no more nodes than onnxslim leaves where onnxslim is installed."""
    transformers = pytest.importorskip("transformers")
    import torch

    import effc
    from effc.ir.ort import session_for

    config = transformers.BertConfig(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    bert = transformers.BertModel(config).eval()

    class Wrapper(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, ids, mask):
            return self.m(input_ids=ids, attention_mask=mask).last_hidden_state

    path = tmp_path / "bert.onnx"
    ids = torch.ones(1, 8, dtype=torch.long)
    dims = {0: "batch", 1: "seq"}
    torch.onnx.export(
        Wrapper(bert),
        (ids, ids),
        str(path),
        input_names=["ids", "mask"],
        output_names=["out"],
        dynamic_axes={"ids": dims, "mask": dims, "out": dims},
        opset_version=14,
        dynamo=False,
    )
    source = effc.load(str(path))
    result = effc.Pipeline.from_text("fixpoint(cleanup,fuse)").run(effc.load(str(path)))
    ops = [n.op_type for n in result.model.model.graph]
    n0 = len(list(source.model.graph))
    assert len(ops) < 0.6 * n0, (len(ops), n0)
    shapes0 = [n.op_type for n in source.model.graph].count("Shape")
    assert ops.count("Shape") <= 4 < shapes0 and ops.count("Concat") <= 2, (ops, shapes0)
    assert [d for d in result.model.model.graph.outputs[0].shape][:2] == ["batch", "seq"]
    a, b = (session_for(m.model, optimize=False) for m in (source, result.model))
    rng = np.random.default_rng(0)
    for batch, seq in ((1, 3), (3, 11)):
        feeds = {"ids": rng.integers(0, 128, (batch, seq)), "mask": np.ones((batch, seq), np.int64)}
        feeds["mask"][:, seq - 1 :] = 0
        x, y = a.run(None, feeds)[0], b.run(None, feeds)[0]
        np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-5)
    try:
        import onnxslim
    except ImportError:
        return
    slim = onnxslim.slim(onnx.load(str(path)))
    assert len(ops) <= len(slim.graph.node), (len(ops), len(slim.graph.node))
