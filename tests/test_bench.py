"""The benchmark harness runs every method on a small shape and renders its table (no timing
assertions: speed targets live in the benchmark's results, never in tests)."""


def test_bench_runs_every_method_and_prints_floors():
    from tools.bench.bsr_linear import run, to_markdown

    result = run([(64, 256)], [1, 3], rotate=1)
    methods = {r["method"] for r in result["rows"]}
    assert (
        len(methods) == 10
        and "effc BSR W4S50 g16" in methods
        and any("MatMulNBits" in m for m in methods)
    )
    assert all(r["ms"] > 0 and r["floor_ms"] > 0 for r in result["rows"])
    w4s50 = next(r for r in result["rows"] if r["method"] == "effc BSR W4S50 g16")
    assert (
        w4s50["weight_bytes"] == 64 * 16 // 2 * 13 + 65 * 4
    )  # 8 B codes + 2 index + 2 scale + 1 zero per block
    table = to_markdown(result, "test")
    assert "## 64x256, M = 3" in table and "x floor" in table
