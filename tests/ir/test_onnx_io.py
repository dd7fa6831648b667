import os

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper, numpy_helper

from effc.errors import InputError
from effc.ir.onnx_io import load_onnx, save_onnx


def _model_with_external(folder, location, offset=0, length=None):
    """A one-node Add model whose initializer lives in external data at ``location``."""
    folder.mkdir(parents=True, exist_ok=True)
    w = numpy_helper.from_array(np.arange(4, dtype=np.float32), "w")
    w.ClearField("raw_data")
    w.data_location = onnx.TensorProto.EXTERNAL
    for k, v in {"location": location, "offset": str(offset), "length": str(length or 16)}.items():
        w.external_data.add(key=k, value=v)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4])],
        [w],
    )
    path = folder / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load_onnx(tmp_path / "nope.onnx")


def test_folder_instead_of_file(tmp_path):
    with pytest.raises(InputError, match="got a folder"):
        load_onnx(tmp_path)


def test_truncated_file(tmp_path, llama_onnx):
    data = llama_onnx["dynamo"].read_bytes()
    for cut in (len(data) // 2, len(data) - 7, 100):
        bad = tmp_path / f"cut{cut}.onnx"
        bad.write_bytes(data[:cut])
        with pytest.raises(InputError, match="not a valid ONNX"):
            load_onnx(bad)


def test_random_bytes(tmp_path):
    bad = tmp_path / "random.onnx"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(InputError, match="not a valid ONNX"):
        load_onnx(bad)


def test_git_lfs_pointer(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    with pytest.raises(InputError, match="Git LFS pointer"):
        load_onnx(bad)


def test_external_data_inside_folder_loads(tmp_path):
    path = _model_with_external(tmp_path / "m", "w.bin")
    (tmp_path / "m" / "w.bin").write_bytes(np.arange(4, dtype=np.float32).tobytes())
    model = load_onnx(path)
    assert model.graph.initializers["w"].const_value.numpy().tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "location, message",
    [("../secret.bin", "leaving the model folder"), ("/etc/passwd", "absolute paths")],
)
def test_external_data_outside_folder_is_refused(tmp_path, location, message):
    (tmp_path / "secret.bin").write_bytes(b"\0" * 16)
    path = _model_with_external(tmp_path / "m", location)
    with pytest.raises(InputError, match=message):
        load_onnx(path)


def test_external_data_symlink_out_of_folder_is_refused(tmp_path):
    (tmp_path / "secret.bin").write_bytes(b"\0" * 16)
    path = _model_with_external(tmp_path / "m", "link.bin")
    os.symlink(tmp_path / "secret.bin", tmp_path / "m" / "link.bin")
    with pytest.raises(InputError, match="resolves outside the model folder"):
        load_onnx(path)


def test_external_data_past_end_of_file_is_refused(tmp_path):
    path = _model_with_external(tmp_path / "m", "w.bin", offset=8)
    (tmp_path / "m" / "w.bin").write_bytes(b"\0" * 16)
    with pytest.raises(InputError, match="exceeds its size"):
        load_onnx(path)


def test_save_with_external_data_stays_in_the_folder_and_round_trips(tmp_path, llama_onnx):
    model = load_onnx(llama_onnx["dynamo"])
    files = save_onnx(model, tmp_path / "out" / "m.onnx", external=True)
    assert [f.name for f in files] == ["m.onnx", "m.onnx.data"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["m.onnx", "m.onnx.data"]
    again = load_onnx(tmp_path / "out" / "m.onnx")
    for name, value in model.graph.initializers.items():
        np.testing.assert_array_equal(
            again.graph.initializers[name].const_value.numpy(), value.const_value.numpy()
        )


def test_failed_save_leaves_nothing(tmp_path, llama_onnx, monkeypatch):
    model = load_onnx(llama_onnx["dynamo"])

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ir, "save", broken)
    with pytest.raises(OSError):
        save_onnx(model, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []
