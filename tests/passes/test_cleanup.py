import numpy as np
from _helpers import from_text, op_types, rng_array, run_pass

import effc

HEADER = '<ir_version: 8, opset_import: ["" : 17]>'


def test_identity_removal_is_bit_identical():
    model = from_text(
        HEADER
        + """
        g (float[2,3] x) => (float[2,3] z) {
            y = Identity(x)
            y2 = Identity(y)
            z = Add(y2, y)
        }"""
    )
    new, record, cmp = run_pass("cleanup", model)
    assert op_types(new) == ["Add"]
    assert record.stats["identities_removed"] == 2
    assert cmp["identical"]


def test_duplicate_and_dead_nodes_are_removed():
    model = from_text(
        HEADER
        + """
        g (float[4] x) => (float[4] z) {
            a = Relu(x)
            b = Relu(x)
            unused = Sigmoid(x)
            z = Mul(a, b)
        }"""
    )
    new, record, cmp = run_pass("cleanup", model)
    assert sorted(op_types(new)) == ["Mul", "Relu"]
    assert record.stats["duplicates_removed"] == 1 and record.stats["dead_nodes_removed"] == 1
    assert cmp["identical"]


def test_static_shape_chain_is_folded_to_a_constant():
    """The legacy exporter's Shape/Gather/Unsqueeze/Concat/Reshape chain collapses when shapes are static."""
    model = from_text(
        HEADER
        + """
        g (float[2,3,4] x) => (float[2,12] y) {
            s = Shape(x)
            i0 = Constant<value = int64 {0}>()
            d0 = Gather<axis = 0>(s, i0)
            u0 = Unsqueeze(d0, axes)
            minus1 = Constant<value = int64[1] {-1}>()
            shape = Concat<axis = 0>(u0, minus1)
            y = Reshape(x, shape)
        }""",
        {"axes": __import__("numpy").array([0], dtype="int64")},
    )
    n0 = len(op_types(model))
    new, record, cmp = run_pass("cleanup", model)
    assert op_types(new) == ["Reshape"]
    assert record.stats["constants_folded"] >= 3
    assert record.stats["nodes_removed"] == n0 - 1
    assert cmp["identical"]


def _dynamic_runs(before, after, feeds_list):
    """Run both models under onnxruntime (no graph optimizations) on each feed: bit-identical."""
    from effc.ir.ort import session_for

    a, b = (session_for(m.model, optimize=False) for m in (before, after))
    for feeds in feeds_list:
        for x, y in zip(a.run(None, feeds), b.run(None, feeds)):
            assert x.shape == y.shape and np.array_equal(x, y)


def test_symbolic_shape_chain_becomes_a_constant_copy_target():
    """Reshape(x, Concat(Shape(x)[0:1], [3, 4])): the symbolic element is x's own dim 0, so the
    target becomes [0, 3, 4] (copy) and the output stays symbolic; equal for every N."""
    text = (
        HEADER
        + """
        g (float[N,12] x) => (float[N,3,4] y) {
            s = Shape<start = 0, end = 1>(x)
            tail = Constant<value = int64[2] {3, 4}>()
            shape = Concat<axis = 0>(s, tail)
            y = Reshape(x, shape)
        }"""
    )
    model = from_text(text)
    result = effc.Pipeline.from_text("cleanup").run(from_text(text))
    assert op_types(result.model) == ["Reshape"]
    target = result.model.model.graph.node(0).inputs[1].const_value.numpy()
    assert target.tolist() == [0, 3, 4]
    assert result.report.records[-1].stats["shape_chains_folded"] >= 1
    _dynamic_runs(model, result.model, [{"x": rng_array(n, 12, seed=n)} for n in (1, 5)])


def test_one_unknown_element_becomes_minus_one_and_two_stay_dynamic():
    """A symbol that is not the input's dim at that position becomes -1 when it is the only one;
    with two such symbols nothing can be inferred and the chain stays."""
    text = (
        HEADER
        + """
        g (float[N,M] x, float[B,T,C] z) => (float[N,M] y, float[T,B,C] w) {
            xt = Transpose<perm = [1, 0]>(x)
            s = Shape(x)
            y = Reshape(xt, s)
            t = Transpose<perm = [1, 0, 2]>(z)
            sz = Shape(t)
            w0 = Reshape(z, sz)
            w = Identity(w0)
        }"""
    )
    result = effc.Pipeline.from_text("cleanup").run(from_text(text))
    ops = op_types(result.model)
    # y: target [N, M] for an input of shape [M, N]: two unknowns, kept
    # w: target [T, B, C] for an input of shape [B, T, C]: C copies (0), T and B unknown, kept
    assert ops.count("Shape") == 2, ops
    text2 = text.replace("sz = Shape(t)", "sz0 = Shape(t)\n            sz = Identity(sz0)")
    feeds = [{"x": rng_array(3, 5, seed=1), "z": rng_array(2, 3, 4, seed=2)}]
    _dynamic_runs(from_text(text2), result.model, feeds)
    one = from_text(
        HEADER
        + """
        g (float[N,6] x) => (float[N,2,3] y) {
            t = Transpose<perm = [1, 0]>(x)
            s = Shape(t)
            n = Gather<axis = 0>(s, i1)
            u = Unsqueeze(n, axes)
            shape = Concat<axis = 0>(u, tail)
            y = Reshape(x, shape)
        }""",
        {
            "i1": np.array(1, np.int64),
            "axes": np.array([0], np.int64),
            "tail": np.array([2, 3], np.int64),
        },
    )
    out = effc.Pipeline.from_text("cleanup").run(one).model
    assert op_types(out) == ["Reshape"]
    # Shape(t)[1] is N, x's dim 0: copied
    assert out.model.graph.node(0).inputs[1].const_value.numpy().tolist() == [0, 2, 3]
    _dynamic_runs(one, out, [{"x": rng_array(n, 6, seed=n)} for n in (1, 4)])


def test_gathered_static_dims_of_a_dynamic_shape_fold():
    """Shape(x)[1] * Shape(x)[2] is static although dim 0 is not; -1 takes the one symbol."""
    text = (
        HEADER
        + """
        g (float[B,4,5] x) => (float[B,20] y) {
            t = Transpose<perm = [0, 2, 1]>(x)
            s = Shape(t)
            a = Gather<axis = 0>(s, i1)
            b = Gather<axis = 0>(s, i2)
            n = Gather<axis = 0>(s, i0)
            ab = Mul(a, b)
            un = Unsqueeze(n, axes)
            uab = Unsqueeze(ab, axes)
            shape = Concat<axis = 0>(un, uab)
            y = Reshape(t, shape)
        }"""
    )
    inits = {
        "i0": np.array(0, np.int64),
        "i1": np.array(1, np.int64),
        "i2": np.array(2, np.int64),
        "axes": np.array([0], np.int64),
    }
    model = from_text(text, inits)
    out = effc.Pipeline.from_text("cleanup").run(from_text(text, inits)).model
    assert sorted(op_types(out)) == ["Reshape", "Transpose"]
    _dynamic_runs(model, out, [{"x": rng_array(n, 4, 5, seed=n)} for n in (1, 3)])


def test_zero_initial_state_of_a_recurrent_op_is_kept_and_folds_where_static():
    """LSTM initial_h/initial_c built as ConstantOfShape(0) stay (onnxruntime's LSTM is slower
    without them): a batch-dependent shape keeps its ConstantOfShape, a static one folds to a
    zero initializer; outputs equal for any batch."""
    rng = np.random.default_rng(0)
    inits = {
        "W": rng.standard_normal((1, 16, 3)).astype(np.float32),
        "R": rng.standard_normal((1, 16, 4)).astype(np.float32),
        "i1": np.array([1], np.int64),
        "one": np.array([1], np.int64),
        "four": np.array([4], np.int64),
    }
    text = (
        HEADER
        + """
        g (float[T,B,3] x) => (float[T,1,B,4] y) {
            s = Shape(x)
            b = Gather<axis = 0>(s, i1)
            shape = Concat<axis = 0>(one, b, four)
            h0 = ConstantOfShape<value = float[1] {0}>(shape)
            y = LSTM<hidden_size = 4>(x, W, R, , , h0, h0)
        }"""
    )
    model = from_text(text, inits)
    result = effc.Pipeline.from_text("cleanup").run(from_text(text, inits))
    (lstm,) = [n for n in result.model.model.graph if n.op_type == "LSTM"]
    assert lstm.inputs[5] is not None and "ConstantOfShape" in op_types(result.model)
    _dynamic_runs(model, result.model, [{"x": rng_array(5, b, 3, seed=b)} for b in (1, 3)])
    static = from_text(
        text.replace("float[T,B,3] x", "float[T,2,3] x").replace(
            "float[T,1,B,4] y", "float[T,1,2,4] y"
        ),
        inits,
    )
    out = effc.Pipeline.from_text("cleanup").run(static).model
    assert op_types(out) == ["LSTM"]
    (lstm,) = out.model.graph
    assert not lstm.inputs[5].const_value.numpy().any()


def test_a_transpose_that_only_moves_size_one_axes_becomes_a_reshape():
    """An LSTM-style [T, 2, 1, H] -> [T, 1, 2, H] transpose is a reshape (no copy); one that
    reorders two larger axes stays."""
    text = (
        HEADER
        + """
        g (float[T,2,1,8] x, float[T,2,3,8] z) => (float[T,1,2,8] y, float[T,3,2,8] w) {
            y = Transpose<perm = [0, 2, 1, 3]>(x)
            w = Transpose<perm = [0, 2, 1, 3]>(z)
        }"""
    )
    model = from_text(text)
    new = effc.Pipeline.from_text("cleanup").run(from_text(text)).model
    assert sorted(op_types(new)) == ["Reshape", "Transpose"]
    feeds = [
        {"x": rng_array(t, 2, 1, 8, seed=t), "z": rng_array(t, 2, 3, 8, seed=t)} for t in (1, 4)
    ]
    _dynamic_runs(model, new, feeds)


def test_constant_nodes_become_initializers_and_then_fold_into_convs():
    """A Conv whose weight is a Constant node (Paddle exports): lifted, so BatchNorm folds."""
    w = rng_array(4, 3, 3, 3, seed=1)
    model = from_text(
        HEADER
        + """
        g (float[1,3,8,8] x) => (float[1,4,6,6] y) {
            w = Constant<value = float[4,3,3,3] {"""
        + ", ".join(f"{v:.6f}" for v in w.reshape(-1))
        + """}>()
            c = Conv(x, w)
            y = BatchNormalization(c, g, b, m, v)
        }""",
        {
            "g": rng_array(4, seed=2, positive=True),
            "b": rng_array(4, seed=3),
            "m": rng_array(4, seed=4),
            "v": rng_array(4, seed=5, positive=True),
        },
    )
    new, record, cmp = run_pass("fixpoint(cleanup,fuse)", model)
    assert op_types(new) == ["Conv"] and cmp["ok"]


def test_cleanup_on_a_model_with_nothing_to_do_reports_no_change():
    model = from_text(
        HEADER
        + """
        g (float[4] x) => (float[4] y) { y = Relu(x) }"""
    )
    new, record, cmp = run_pass("cleanup", model)
    assert not record.modified and record.stats["nodes_removed"] == 0 and cmp["identical"]


def test_cleanup_on_fx_removes_dead_and_noop_nodes(tiny_cnn):
    from effc.ir.model import FxModel

    model = FxModel(tiny_cnn, tiny_cnn.example_inputs())
    graph = model.graph_module.graph
    out = next(n for n in graph.nodes if n.op == "output")
    last = out.args[0][0]
    with graph.inserting_before(out):
        alias = graph.call_function(__import__("torch").ops.aten.alias.default, (last,))
        graph.call_function(__import__("torch").ops.aten.relu.default, (last,))
    out.args = ((alias,),)
    model.graph_module.recompile()
    record = (
        effc.Pipeline.from_text("cleanup", instruments=[effc.VerifyInstrument()])
        .run(model)
        .report.records[0]
    )
    assert record.stats["noops_removed"] == 1
    assert record.stats["dead_nodes_removed"] >= 1
    assert (
        "aten::relu.default" in record.ops_before and "aten::relu.default" not in record.ops_after
    )
    assert record.error["identical"]


def test_weights_folded_through_constants_keep_values():
    w = rng_array(3, 3)
    model = from_text(
        HEADER
        + """
        g (float[2,3] x) => (float[2,3] y) {
            wt = Transpose<perm = [1, 0]>(w)
            y = MatMul(x, wt)
        }""",
        {"w": w},
    )
    new, record, cmp = run_pass("cleanup", model)
    assert op_types(new) == ["MatMul"]
    assert cmp["ok"]


def test_chained_slices_of_other_axes_merge_into_one_each():
    """x[:, 0:4][..., 1::2] and x[:, 0:4][..., ::2] (YOLOX's focus, STFT halves): the shared first
    Slice merges into both users; a Slice of the same axis does not merge."""
    inits = {
        "s0": np.array([0], np.int64),
        "e4": np.array([4], np.int64),
        "a1": np.array([1], np.int64),
        "a2": np.array([2], np.int64),
        "s1": np.array([1], np.int64),
        "big": np.array([1 << 62], np.int64),
        "two": np.array([2], np.int64),
    }
    text = (
        HEADER
        + """
        g (float[B,6,T] x) => (float[B,4,U] y, float[B,4,V] z, float[B,3,T] w) {
            a = Slice(x, s0, e4, a1)
            y = Slice(a, s1, big, a2, two)
            z = Slice(a, s0, big, a2, two)
            b = Slice(x, s1, big, a1)
            w = Slice(b, s0, e4, a1)
        }"""
    )
    model = from_text(text, inits)
    new = effc.Pipeline.from_text("cleanup").run(from_text(text, inits)).model
    assert op_types(new).count("Slice") == 4  # a merged away; b -> w (same axis) kept
    _dynamic_runs(model, new, [{"x": rng_array(n, 6, t, seed=n)} for n, t in ((1, 7), (2, 8))])


def test_unsqueeze_of_squeeze_on_the_same_axis_is_dropped():
    text = (
        HEADER
        + """
        g (float[1,B,4] x) => (float[1,B,4] y, float[B,1,4] z) {
            s = Squeeze(x, a0)
            r = Relu(s)
            u = Unsqueeze(s, a0)
            y = Relu(u)
            z = Unsqueeze(r, a1)
        }"""
    )
    inits = {"a0": np.array([0], np.int64), "a1": np.array([1], np.int64)}
    model = from_text(text, inits)
    new = effc.Pipeline.from_text("cleanup").run(from_text(text, inits)).model
    assert sorted(op_types(new)) == ["Relu", "Relu", "Squeeze", "Unsqueeze"]
    _dynamic_runs(model, new, [{"x": rng_array(1, b, 4, seed=b)} for b in (1, 3)])


def test_dims_equal_through_matmul_and_reshape_are_seen_as_equal():
    """CRNN heads: Reshape(Gemm(Reshape(x, [-1, C])), Concat(Shape(x)[0], [1, -1])). The first
    dim of the Gemm's output is x's dim 0 by symbolic inference, so the target becomes
    [0, 1, -1]; the chain is gone and the output equal for every length."""
    rng = np.random.default_rng(0)
    inits = {
        "flat": np.array([-1, 8], np.int64),
        "W": rng.standard_normal((8, 5)).astype(np.float32),
        "i0": np.array(0, np.int64),
        "axes": np.array([0], np.int64),
        "tail": np.array([1, -1], np.int64),
    }
    text = (
        HEADER
        + """
        g (float[T,1,8] x) => (float[T,1,5] y) {
            f = Reshape(x, flat)
            m = MatMul(f, W)
            s = Shape(x)
            t = Gather<axis = 0>(s, i0)
            u = Unsqueeze(t, axes)
            shape = Concat<axis = 0>(u, tail)
            y = Reshape(m, shape)
        }"""
    )
    model = from_text(text, inits)
    new = effc.Pipeline.from_text("cleanup").run(from_text(text, inits)).model
    assert sorted(op_types(new)) == ["MatMul", "Reshape", "Reshape"]
    _dynamic_runs(model, new, [{"x": rng_array(t, 1, 8, seed=t)} for t in (1, 6)])


def test_neutral_arithmetic_goes_unless_it_broadcasts():
    """x + 0, x * 1, 1 * x, x / 1 go; x + zeros of a larger shape (it broadcasts x) and
    0 - x stay; consecutive Unsqueezes become one."""
    inits = {
        "z4": np.zeros(4, np.float32),
        "one": np.ones((1, 4), np.float32),
        "z34": np.zeros((3, 4), np.float32),
        "a0": np.array([0], np.int64),
        "a2": np.array([2], np.int64),
    }
    text = (
        HEADER
        + """
        g (float[B,4] x) => (float[B,4] y, float[3,4] w, float[B,4] v, float[1,B,1,4] u) {
            a = Add(x, z4)
            b = Mul(one, a)
            c = Div(b, one)
            y = Relu(c)
            w = Add(x, z34)
            v = Sub(z4, x)
            u0 = Unsqueeze(y, a0)
            u = Unsqueeze(u0, a2)
        }"""
    )
    model = from_text(text, inits)
    new = effc.Pipeline.from_text("cleanup").run(from_text(text, inits)).model
    assert sorted(op_types(new)) == ["Add", "Relu", "Sub", "Unsqueeze"]
    feeds = [{"x": rng_array(b, 4, seed=b)} for b in (1,)]  # w broadcasts only for B = 1 or 3
    _dynamic_runs(model, new, feeds)
