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


def test_symbolic_shape_chain_is_kept():
    model = from_text(
        HEADER
        + """
        g (float[N,12] x) => (float[N,3,4] y) {
            s = Shape<start = 0, end = 1>(x)
            tail = Constant<value = int64[2] {3, 4}>()
            shape = Concat<axis = 0>(s, tail)
            y = Reshape(x, shape)
        }"""
    )
    result = effc.Pipeline.from_text("cleanup").run(model)
    assert "Shape" in op_types(result.model) and "Reshape" in op_types(result.model)


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
