"""The benchmark harness runs every method on a small shape and renders its table (no timing
assertions: speed targets live in the benchmark's results, never in tests)."""

import pytest


def test_bench_runs_every_method_and_prints_floors():
    from tools.bench.bsr_linear import run, to_markdown

    result = run([(64, 256)], [1, 3], rotate=1)
    methods = {r["method"] for r in result["rows"]}
    from effc.runtime.cpu import kernels

    k = kernels()
    assert (
        # the AVX2-only rows need AVX-512 (else they are the main rows)
        len(methods) == 11 + 2 * k.has_avx512()
        and "effc BSR W4S50 g16" in methods
        and any("MatMulNBits" in m for m in methods)
    )
    assert all(r["ms"] > 0 and r["floor_ms"] > 0 for r in result["rows"])
    w4s50 = next(r for r in result["rows"] if r["method"] == "effc BSR W4S50 g16")
    assert (
        w4s50["weight_bytes"] == 64 * 16 // 2 * 13 + 65 * 4
    )  # 8 B codes + 2 index + 2 scale + 1 zero per block
    assert k.use_avx512(True) == k.has_avx512()  # the AVX2-only row turned it back on
    table = to_markdown(result, "test")
    assert "## 64x256, M = 3" in table and "x floor" in table


def test_l3_size_is_read_from_sysfs(tmp_path):
    from tools.bench.bsr_linear import l3_bytes

    for i, (level, size) in enumerate([("1", "48K"), ("2", "2048K"), ("3", "491520K")]):
        (tmp_path / f"index{i}").mkdir()
        (tmp_path / f"index{i}" / "level").write_text(level + "\n")
        (tmp_path / f"index{i}" / "size").write_text(size + "\n")
    assert l3_bytes(root=str(tmp_path)) == 480 * 2**20
    assert l3_bytes(default=7, root=str(tmp_path / "missing")) == 7


def test_ditn_ort_bench_builds_equal_models_and_renders():
    import numpy as np

    from tools.bench.ditn_ort import build, session, time_sessions, to_markdown, traffic_bytes

    models = build("random", 16)
    assert len(models) == 6
    rows = []
    for name, (original, optimized, _report, x) in models.items():
        feeds = {"x": x["x"].numpy()}
        sessions = {
            side: session(m.model, True) for side, m in (("export", original), ("effc", optimized))
        }
        outs = {k: s.run(None, feeds)[0] for k, s in sessions.items()}
        np.testing.assert_allclose(outs["effc"], outs["export"], rtol=1e-4, atol=1e-5)
        ms = time_sessions(sessions, feeds, rounds=1, calls=1)
        assert traffic_bytes(optimized.model) > 0 and all(v > 0 for v in ms.values())
        rows.append(
            {
                "model": name,
                "ort_optimizations": "on",
                "export_ms": ms["export"],
                "effc_ms": ms["effc"],
                "speedup": ms["export"] / ms["effc"],
                "export_nodes": 1,
                "effc_nodes": 1,
                "export_floor_ms": 1.0,
                "effc_floor_ms": 1.0,
                "max_abs_error": 0.0,
            }
        )
    meta = {
        "command": "test",
        "input": "16",
        "pipeline": "p",
        "threads": 2,
        "onnxruntime": "x",
        "bandwidth_GBps": 1.0,
    }
    assert "| DITN (unfold per layer), legacy, opset 14 | on |" in to_markdown(meta, rows)


def test_perplexity_table_shows_the_calibration_gap_where_measured():
    """Stage rows with a perplexity on the calibration windows print it; older rows print '-'."""
    from types import SimpleNamespace

    from tools.quality.perplexity import DEFAULT_OUT, to_markdown

    meta = {"model": "m", "eval": "e", "calibration": "c", "split": "s", "threads": 2}
    nobytes = {"values": 4e6, "indices": 0, "scales": 0}
    rows = [
        {
            "setting": "fp32",
            "pipeline": "",
            "perplexity": 20.0,
            "calib_perplexity": 19.5,
            "bytes": nobytes,
        },
        {
            "setting": "new",
            "pipeline": "p",
            "perplexity": 400.0,
            "bytes": nobytes,
            "stages": [
                {"after": "a", "perplexity": 500.0, "calib_perplexity": 21.25, "seconds": 3}
            ],
        },
        {
            "setting": "old",
            "pipeline": "q",
            "perplexity": 300.0,
            "bytes": nobytes,
            "stages": [{"after": "b", "perplexity": 310.0, "seconds": 4}],
        },
    ]
    args = SimpleNamespace(
        windows=16, seqlen=512, calib_samples=16, calib_order="first", rows=None, out=DEFAULT_OUT
    )
    table = to_markdown(meta, rows, args)
    assert "--out" not in table
    args.out, args.calib_order = "elsewhere/t", "shuffled"
    assert "--calib-order shuffled --out elsewhere/t`" in to_markdown(meta, rows, args)
    assert "(fp32: 19.50)" in table
    assert "| new | `a` | 500.00 | 21.25 | 3 |" in table
    assert "| old | `b` | 310.00 | - | 4 |" in table


def test_perplexity_tool_keeps_its_rows_and_refuses_a_table_of_other_settings(tmp_path):
    import json

    import pytest

    from tools.quality.perplexity import ROWS, kept_rows, row_spec

    meta = {"model": "m", "eval": "e", "calibration": "c", "split": "s", "threads": 2}
    current = {"setting": "W4 g16 RTN", "pipeline": row_spec("W4 g16 RTN", 16)[0]}
    stale = {"setting": "W4 g32 RTN", "pipeline": "quantize{bits=4,group=999}"}
    gone = {"setting": "a row no longer in ROWS", "pipeline": "x"}
    assert gone["setting"] not in ROWS
    table = tmp_path / "t.json"
    assert kept_rows(table, meta, 16, False) == []  # no table yet
    table.write_text(json.dumps({"meta": meta, "rows": [current, stale, gone]}))
    assert kept_rows(table, meta, 16, False) == [current]
    other = dict(meta, calibration="c, shuffled")
    with pytest.raises(
        ValueError, match=r"holds 3 rows run with other settings \(calibration differ"
    ):
        kept_rows(table, other, 16, False)
    assert kept_rows(table, other, 16, True) == []
    assert json.loads(table.read_text())["rows"] == [current, stale, gone]  # nothing written


def test_quality_windows_first_and_shuffled():
    import pytest
    import torch

    from tools.quality.data import windows

    class Tok:  # token ids 0 .. n-1: a window's ids tell where in the text it lies
        def __call__(self, text, return_tensors, add_special_tokens):
            assert return_tensors == "pt" and not add_special_tokens
            return type("Enc", (), {"input_ids": torch.arange(len(text))[None]})()

    text = "x" * 1000  # 62 whole windows of 16 (the 8 tokens left over are never used)
    first = windows(Tok(), text, 4, 16)
    assert torch.equal(first, torch.arange(64).view(4, 16))
    shuffled = windows(Tok(), text, 10, 16, order="shuffled")
    starts = shuffled[:, 0]
    # whole aligned windows, none twice, spread over the text, the same on every call
    assert torch.equal(shuffled, starts[:, None] + torch.arange(16))
    assert bool((starts % 16 == 0).all()) and len(set(starts.tolist())) == 10
    assert int(starts.max()) >= 16 * 30 and int(starts.max()) + 16 <= 992
    assert torch.equal(shuffled, windows(Tok(), text, 10, 16, order="shuffled"))
    # nested: a smaller count takes the first windows of a larger one
    assert torch.equal(windows(Tok(), text, 3, 16, order="shuffled"), shuffled[:3])
    assert not torch.equal(windows(Tok(), text, 10, 16, order="shuffled", seed=1), shuffled)
    with pytest.raises(ValueError, match="window order 'random'"):
        windows(Tok(), text, 3, 16, order="random")
    with pytest.raises(ValueError, match="fewer than 63 x 16"):
        windows(Tok(), text, 63, 16, order="shuffled")


def test_scale_bench_writes_a_loadable_sharded_llama_and_measures_anonymous_memory(tmp_path):
    import sys

    import torch

    transformers = pytest.importorskip("transformers")
    from tools.bench.scale import measure, write_llama

    params = write_llama(tmp_path / "m", blocks=2, hidden=64, inter=160, heads=4, vocab=256)
    index = (tmp_path / "m" / "model.safetensors.index.json").read_text()
    assert "model-00003-of-00003.safetensors" in index  # one shard per block + the rest
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert sum(p.numel() for p in model.parameters()) == params
    assert next(model.parameters()).dtype == torch.bfloat16
    # a child that allocates and touches 300 MB: RssAnon sees it, the exit status comes back
    got = measure([sys.executable, "-c", "b = bytearray(300 << 20); import time; time.sleep(0.3)"])
    assert got["rc"] == 0 and got["peak_anon"] > 290 << 20 and got["peak_hwm"] >= got["peak_anon"]


def test_scale_bench_splits_streamed_time_per_block_and_pass():
    from tools.bench.scale import markdown, time_split

    stage = lambda name, s, q: {"stage": name, "seconds": s, "passes": {"quantize": {"seconds": q}}}  # noqa: E731
    report = {
        "stages": [
            {"stage": "embeddings", "seconds": 1.0},
            stage("model.layers.0", 10.0, 4.0),
            stage("model.layers.1", 12.0, 6.0),
            stage("model.layers.2", 11.0, 5.0),
            stage("head", 3.0, 2.0),
        ]
    }
    split = time_split(report)
    assert split == {"block_seconds": 11.0, "pass_seconds": {"quantize": 5.0}}
    row = {"blocks": 3, "params": 1e6, "peak_anon": 0, "peak_hwm": 0, "bytes_per_param": 0}
    row.update(rc=0, seconds=40.0, **split)
    data = {"shape": {}, "passes": "quantize", "target": "bsr", "extra_args": "", "rows": [row]}
    # 40 s - 3 x 11 s outside the blocks; 32 x 11 + 7 for LLaMA-7B's 32 blocks
    assert "| 3 | 11.0 | quantize 5.0 | 7.0 | 359 |" in markdown(data, "cmd")
    assert time_split({"stages": [{"stage": "head", "seconds": 1.0}]}) == {}


def test_decode_bench_counts_a_shared_weight_per_read_and_once_resident():
    """FoldGPT rows of tools/bench/decode: a weight two blocks share is read by both each token,
    but held once; swapped to BSR, the same."""
    transformers = pytest.importorskip("transformers")
    import torch

    import effc
    from effc.runtime.modules import swap_linears
    from tools.bench.decode import FOLD_PIPELINES, linear_bytes, pipelines, resident_bytes

    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    dense = linear_bytes(model)
    assert resident_bytes(model) == dense
    block = sum(
        p.numel() * 4 for n, p in model.model.layers[0].named_parameters() if "norm" not in n
    )
    result = effc.Pipeline.from_text("share-blocks{group=2},quantize{bits=8,group=16}").run(
        model, effc.PassContext()
    )
    assert linear_bytes(model) == dense and resident_bytes(model) == dense - 2 * block
    swap_linears(model, result.model.compression, decide=False)
    packed = linear_bytes(model)
    assert packed < dense / 2 and resident_bytes(model) < 0.6 * packed
    assert pipelines(None, fold=True) == FOLD_PIPELINES and "custom" in pipelines("quantize")


def test_pareto_reads_a_rows_format_and_marks_the_front():
    """tools/quality/pareto: the decode speed a row takes is its stored format's (blocks removed,
    sharing, bits, group, group sparsity), and a dominated row is off the front."""
    from tools.quality.pareto import format_of, front

    assert format_of("-") == (0, 0, None, None, 0.0)
    assert format_of("group-prune{sparsity=0.5,score=obs},quantize{bits=4,group=16}") == (
        0,
        0,
        4,
        16,
        0.5,
    )
    assert format_of("remove-blocks{count=6,samples=16},share-blocks{group=2},quantize") == (
        6,
        2,
        4,
        16,
        0.0,
    )
    # trained or not, the same stored format decodes at the same speed
    trained = "group-prune{sparsity=0.5},quantize{bits=4,group=16},gqsa-train{stage=e2e,steps=8}"
    assert format_of(trained) == format_of("group-prune{sparsity=0.5},quantize{bits=4,group=16}")
    # (bytes, perplexity): the second is dominated by the first (fewer bytes, lower perplexity)
    assert front([(50, 10.0), (60, 12.0), (40, 30.0)], more_is_better=False) == [True, False, True]
    assert front([(2.0, 10.0), (1.0, 12.0)], more_is_better=True) == [True, False]
    # the committed decode tables: each format takes its own row ("remove 6 + W4", whose name
    # starts like "remove 6"'s)
    from tools.quality.pareto import speeds

    found = speeds()
    assert found[(6, 0, 4, 16, 0.0)]["source"].endswith("remove 6 + W4 BSR (effc kernels)")
    assert found[(6, 0, None, None, 0.0)]["source"].endswith("remove 6 (fp32)")


def test_mobilenet_merge_puts_committed_rows_in_one_table_and_refuses_mixed_settings(tmp_path):
    import json

    from tools.quality.mobilenet import merge

    row = {"sparsity": 0.3, "method": "rearrange + obs + recover", "achieved": 0.3}
    row.update(top1=0.5, top5=0.7, kl=1.0, seconds=1.0)
    for name, crops in (("a", 1000), ("b", 1000), ("c", 500)):
        data = {"model": "m", "eval_crops": crops, "calib_crops": 128, "rows": [row]}
        if name == "b":  # calibrated on synthesized images: the same settings otherwise
            data["calib_source"] = "synthetic"
        (tmp_path / f"{name}.json").write_text(json.dumps(data))
        (tmp_path / f"{name}.md").write_text(f"x\n\n`python -m tools.quality.mobilenet --{name}`\n")
    data, text = merge([str(tmp_path / "a"), str(tmp_path / "b")])
    assert (
        len(data["rows"]) == 2
        and "| 30% | rearrange + obs + recover | photos | yes | yes |" in text
    )
    assert "| 30% | rearrange + obs + recover | synthetic | yes | yes |" in text
    assert "`python -m tools.quality.mobilenet --b`" in text
    with pytest.raises(SystemExit, match="different settings"):
        merge([str(tmp_path / "a"), str(tmp_path / "c")])


def test_litert_writer_matches_onnxruntime_and_stores_1x1_weights_sparse(tmp_path):
    """A MobileNetV2 graph (stride-2 padded stem, depthwise, 1x1, residual add, mean, Gemm)
    written as TFLite runs in LiteRT's XNNPACK delegate to onnxruntime's output, dense and
    with the 1x1 weights stored sparse (DENSIFY over CSR); other ops are refused."""
    import numpy as np
    import onnx_ir as ir

    pytest.importorskip("ai_edge_litert")
    from ai_edge_litert import schema_py_generated as s

    from effc.compile import compile_model
    from effc.context import PassContext
    from effc.errors import UnsupportedError
    from effc.ir.ort import open_session, session_options
    from effc.ir.torch_io import load_model
    from tools.bench.litert import litert_call, onnx_to_tflite, zero_fraction_1x1

    passes = "kernel-sparsity{sparsity=0.7,patterns=[pointwise:8x1,linear:dense,conv:dense]}"
    model = load_model("builtin:mobilenet-v2")
    compile_model(model, passes, tmp_path, "onnxruntime", PassContext(), force=True, verify=False)
    path = tmp_path / "model.onnx"
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224), np.float32)
    want = open_session(str(path), session_options(1, True)).run(None, {"pixels": x})[0]
    for sparse in (False, True):
        got = litert_call(path, sparse, x, 1)()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)
    graph = ir.load(str(path))
    zeros = zero_fraction_1x1(graph)
    assert 2 / 3 <= zeros < 0.9  # 70% of the model's budget, mostly on the 1x1 convs
    tfl = s.ModelT.InitFromPackedBuf(onnx_to_tflite(graph, sparse=True), 0)
    codes = [c.builtinCode for c in tfl.operatorCodes]
    ops = [codes[o.opcodeIndex] for o in tfl.subgraphs[0].operators]
    shapes = [n.inputs[1].const_value.numpy().shape for n in graph.graph if n.op_type == "Conv"]
    pointwise = sum(1 for shape in shapes if shape[2:] == (1, 1))
    assert ops.count(s.BuiltinOperator.DENSIFY) == pointwise > 0
    stored = [t for t in tfl.subgraphs[0].tensors if t.sparsity is not None]
    kept = sum(len(t.sparsity.dimMetadata[-1].arrayIndices.values) for t in stored)
    total = sum(int(np.prod(t.shape)) for t in stored)
    assert kept / total == pytest.approx(1 - zeros)  # only the nonzeros are stored
    # a graph with an op the writer does not know is refused by name
    next(n for n in graph.graph if n.op_type == "Add").op_type = "Sub"
    with pytest.raises(UnsupportedError, match="Sub"):
        onnx_to_tflite(graph)


def test_litert_layers_reads_the_build_and_writes_one_conv_models_litert_runs(tmp_path):
    """The per-layer comparison's one-conv models run in LiteRT to onnxruntime's output (a
    stride-2 depthwise conv and a 1x1), and the build's layer records are read with the chosen
    time of each layer."""
    import numpy as np
    import onnx_ir as ir

    pytest.importorskip("ai_edge_litert")
    from effc.ir.ort import open_session, session_options
    from tools.bench.litert import litert_call
    from tools.bench.litert_layers import layers_of, one_conv

    for spec in [(16, 16, 3, 2, 16, 14), (24, 16, 1, 1, 1, 7)]:
        path = tmp_path / "conv.onnx"
        ir.save(one_conv(*spec), str(path))
        x = np.random.default_rng(1).standard_normal((1, spec[1], spec[5], spec[5]), np.float32)
        want = open_session(str(path), session_options(1, True)).run(None, {"x": x})[0]
        got = litert_call(path, False, x, 1)()
        np.testing.assert_allclose(got.transpose(0, 3, 1, 2), want, rtol=1e-4, atol=1e-5)
    meta = {
        "conv_layers": [
            {
                "shape": [32, 3, 3, 3],
                "groups": 1,
                "stride": 2,
                "pixels": 50176,
                "dense_us": 500.0,
                "kernel_us": 150.0,
                "choice": "kernel",
            },
            {
                "shape": [96, 1, 3, 3],
                "groups": 96,
                "stride": 1,
                "pixels": 196,
                "dense_us": 30.0,
                "kernel_us": 40.0,
                "choice": "dense",
            },
            {"shape": [8, 1, 3, 3], "groups": 8, "stride": 1, "pixels": 196, "choice": "dense"},
        ],
        "sparse_layers": [
            {
                "shape": [24, 96, 1, 1],
                "pixels": 3136,
                "density": 0.7,
                "dense_us": 280.0,
                "sparse_us": 50.0,
                "choice": "sparse",
            },
        ],
    }
    rows = layers_of(meta)  # the untimed layer is left out
    assert [(r["kind"], r["spec"], r["effc_us"]) for r in rows] == [
        ("3x3", (32, 3, 3, 2, 1, 224), 150.0),
        ("depthwise", (96, 96, 3, 1, 96, 14), 30.0),
        ("1x1", (24, 96, 1, 1, 1, 56), 50.0),
    ]
    # the whole model's step profile, by kernel family, beside the same layers alone
    from tools.bench.litert_layers import family, markdown

    assert family("effc_bsr_pointwise_52") == "1x1 (effc sparse kernel)"
    assert family("fused_conv2d1_add1_maximum9_minimum9") == "conv (TVM's operator)"
    assert family("mean3") == "mean"
    for r in rows:
        r["xnnpack_us"], r["ratio"] = 40.0, r["effc_us"] / 40.0
    steps = {
        "whole_us": 400.0,
        "steps_us": 380.0,
        "families": {
            "1x1 (effc sparse kernel)": {"steps": 1, "us": 100.0},
            "KxK and depthwise (effc direct kernel)": {"steps": 1, "us": 250.0},
            "conv (TVM's operator)": {"steps": 1, "us": 30.0},
        },
    }
    kinds = {"all": {"layers": 3, "effc_us": 230.0, "xnnpack_us": 120.0}}
    data = {"sparsity": 0.3, "threads": 2, "rows": rows, "kinds": kinds, "steps": steps}
    data["whole_ms"] = {"effc": 0.4, "xnnpack": 0.3}
    text = markdown(data, "cmd")
    assert "| 1x1 (effc sparse kernel) | 1 | 100 | 50 | 2.00 |" in text
    assert "| KxK and depthwise (effc direct kernel) | 1 | 250 | 150 | 1.67 |" in text
    assert "| the executor outside its steps | | 20 | | |" in text
