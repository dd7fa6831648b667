"""The compiled CPU kernels against the dequantized dense reference (fp32 tolerance)."""

import numpy as np
import pytest
import torch
from _helpers import random_matrix


@pytest.fixture(scope="module")
def kernels():
    from effc.runtime.cpu import kernels

    return kernels()


@pytest.fixture(scope="module", params=["avx512", "avx2"])
def fp32_kernels(request, kernels):
    """The fp32-x kernels both ways: for M > 1 AVX-512 CPUs take the AVX-512 ones, and the AVX2
    ones (every other x86-64 CPU) are tested here too by turning the AVX-512 path off."""
    if request.param == "avx512" and not kernels.has_avx512():
        pytest.skip("this CPU has no AVX-512")
    kernels.use_avx512(request.param == "avx512")
    yield kernels
    kernels.use_avx512(True)


@pytest.fixture(scope="module", params=["vnni", "avx2"])
def a8_kernels(request, kernels):
    """The int8-activation kernels both ways: AVX512-VNNI CPUs take the VNNI ones, every other
    CPU the AVX2 ones (also tested on VNNI machines by turning the AVX-512 kernels off)."""
    if request.param == "vnni" and not kernels.has_vnni():
        pytest.skip("this CPU has no AVX512-VNNI")
    kernels.use_avx512(request.param == "vnni")
    yield kernels
    kernels.use_avx512(True)


def _run(k, m, x):
    return k.bsr_linear(
        x, m.indptr, m.indices, m.values, m.scales, m.zeros, m.shape[0], m.group, m.bits
    )


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [16, 32, 64, 128])
@pytest.mark.parametrize("M", [1, 2, 3, 8, 9, 12, 17, 64])
def test_matches_dense_reference(fp32_kernels, bits, group, M):
    kernels = fp32_kernels
    m, _ = random_matrix(
        out=37, inp=group * 5, group=group, bits=bits, density=0.5, seed=M * group + bits
    )
    x = torch.randn(M, m.shape[1], generator=torch.Generator().manual_seed(M))
    w = m.to_dense().double()
    exact = x.double() @ w.T
    # fp32 accumulation error grows with sum |x_j w_j|, not with the result (which may cancel)
    bound = 1e-5 * (x.double().abs() @ w.abs().T) + 1e-6
    err = (_run(kernels, m, x).double() - exact).abs()
    assert (err <= bound).all(), (
        f"max error {err.max():.3g}, worst error/bound {(err / bound).max():.3g}"
    )


def test_ragged_empty_and_fully_dense_rows(fp32_kernels):
    kernels = fp32_kernels
    from effc.runtime.format import from_quantized

    out, ng, g = 6, 8, 16
    codes = torch.randint(0, 16, (out, ng, g), dtype=torch.uint8)
    mask = torch.zeros(out, ng, dtype=torch.bool)
    mask[1] = True  # fully dense row
    mask[3, :3] = True  # ragged
    mask[4, 5] = True  # one block; rows 0, 2 and 5 are empty
    m = from_quantized(
        codes, torch.rand(out, ng), torch.randint(0, 16, (out, ng), dtype=torch.uint8), mask, 4
    )
    for M in (1, 4, 12):  # GEMV, one tile, K-chunked small GEMM
        x = torch.randn(M, ng * g)
        y = _run(kernels, m, x)
        torch.testing.assert_close(y, x @ m.to_dense().T, rtol=1e-4, atol=1e-4)
        assert torch.all(y[:, [0, 2, 5]] == 0)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_rows_split_by_blocks_cover_every_row(fp32_kernels, threads):
    """Threads split rows by block count; a skewed matrix (many empty rows, then dense ones) still
    gets every row computed exactly once, whatever the thread count."""
    kernels = fp32_kernels
    from effc.runtime.format import from_quantized

    out, ng, g = 41, 6, 16
    gen = torch.Generator().manual_seed(threads)
    mask = torch.zeros(out, ng, dtype=torch.bool)
    mask[30:] = True
    mask[7, 2] = True
    codes = torch.randint(0, 16, (out, ng, g), dtype=torch.uint8, generator=gen)
    zeros = torch.randint(0, 16, (out, ng), dtype=torch.uint8, generator=gen)
    m = from_quantized(codes, torch.rand(out, ng, generator=gen), zeros, mask, 4)
    x = torch.randn(11, ng * g, generator=gen)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for rows in (x[:1], x[:3], x):
            torch.testing.assert_close(
                _run(kernels, m, rows), rows @ m.to_dense().T, rtol=1e-5, atol=1e-5
            )
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("group", [16, 64])
def test_many_panels_chunks_and_tiles(fp32_kernels, group):
    """Enough rows for several row panels per thread, enough K for several column chunks, and M
    = 40 for three tiles of x (the last one partial), as in the M > 8 GEMM on real layers."""
    kernels = fp32_kernels
    m, _ = random_matrix(out=600, inp=4096, group=group, bits=4, density=0.5, seed=group)
    x = torch.randn(40, 4096, generator=torch.Generator().manual_seed(group))
    w = m.to_dense().double()
    err = (_run(kernels, m, x).double() - x.double() @ w.T).abs()
    assert (err <= 1e-5 * (x.double().abs() @ w.abs().T) + 1e-6).all()


@pytest.mark.parametrize("M", [9, 64])
def test_fewer_column_blocks_than_a_chunk(fp32_kernels, M):
    """K of two blocks: fewer column blocks than the GEMMs' smallest K chunk."""
    m, _ = random_matrix(out=40, inp=32, group=16, bits=4, density=0.5, seed=M)
    x = torch.randn(M, 32, generator=torch.Generator().manual_seed(M))
    w = m.to_dense().double()
    err = (_run(fp32_kernels, m, x).double() - x.double() @ w.T).abs()
    assert (err <= 1e-5 * (x.double().abs() @ w.abs().T) + 1e-6).all()


def test_no_dense_weight_is_allocated(kernels):
    """Peak allocation during a call is the output, not a weight-sized buffer."""
    m, _ = random_matrix(out=1024, inp=2048, group=16, bits=4, density=0.5)
    x = torch.randn(1, 2048)
    _run(kernels, m, x)
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        _run(kernels, m, x)
    allocated = sum(max(e.cpu_memory_usage, 0) for e in prof.events())
    dense_bytes = 1024 * 2048 * 4
    assert allocated <= 1024 * 4 * 4, allocated  # the (1, 1024) output and little else
    assert allocated < dense_bytes / 100


def test_bad_arguments_are_errors(kernels):
    m, _ = random_matrix()
    with pytest.raises(RuntimeError, match="contiguous float32"):
        _run(kernels, m, torch.randn(1, 64, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="group must"):
        kernels.bsr_linear(
            torch.randn(1, 64), m.indptr, m.indices, m.values, m.scales, m.zeros, 8, 24, 4
        )


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("M", [1, 64])
def test_long_rows(fp32_kernels, bits, M):
    """K = 10240 (x larger than L1; at M = 64 the small GEMM walks K in chunks of 48 blocks):
    ragged rows whose blocks sit in one region only, empty rows and full rows included."""
    kernels = fp32_kernels
    from effc.runtime.format import from_quantized

    out, group = 7, 16
    ng = 10240 // group
    gen = torch.Generator().manual_seed(bits)
    mask = torch.rand(out, ng, generator=gen) < 0.4
    mask[1] = False  # empty
    mask[2] = True  # full
    mask[3] = False
    mask[3, 300:310] = True  # only in the second chunk
    codes = torch.randint(0, 2**bits, (out, ng, group), dtype=torch.uint8, generator=gen)
    zeros = torch.randint(0, 2**bits, (out, ng), dtype=torch.uint8, generator=gen)
    m = from_quantized(codes, torch.rand(out, ng, generator=gen) * 0.01, zeros, mask, bits)
    x = torch.randn(M, ng * group, generator=gen)
    w = m.to_dense().double()
    err = (_run(kernels, m, x).double() - x.double() @ w.T).abs()
    assert (err <= 1e-5 * (x.double().abs() @ w.abs().T) + 1e-6).all()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [16, 32])
def test_gemv_row_pairs(fp32_kernels, bits, group):
    """M = 1 takes short rows two at a time where neighbours hold the same number of blocks (per-row
    budgets): pairs of empty, one-block, odd, 32-block (the last paired size) and 33-block rows,
    pairs broken by an unequal neighbour, and a last row without a partner, on 1-3 threads."""
    from effc.runtime.format import from_quantized

    counts = [0, 0, 1, 1, 5, 5, 18, 18, 3, 18, 18, 32, 32, 33, 33, 7, 7, 7]
    out, ng = len(counts), 40
    gen = torch.Generator().manual_seed(bits + group)
    mask = torch.zeros(out, ng, dtype=torch.bool)
    for r, n in enumerate(counts):
        mask[r, torch.randperm(ng, generator=gen)[:n]] = True
    codes = torch.randint(0, 2**bits, (out, ng, group), dtype=torch.uint8, generator=gen)
    zeros = torch.randint(0, 2**bits, (out, ng), dtype=torch.uint8, generator=gen)
    m = from_quantized(codes, torch.rand(out, ng, generator=gen) + 0.01, zeros, mask, bits)
    x = torch.randn(1, ng * group, generator=gen)
    w = m.to_dense().double()
    exact, bound = x.double() @ w.T, 1e-5 * (x.double().abs() @ w.abs().T) + 1e-6
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        y = _run(fp32_kernels, m, x).double()
        assert (y[0, :2] == 0).all()
        assert ((y - exact).abs() <= bound).all()
    torch.set_num_threads(2)


def _quantized_x(x, group):
    """The int8-activation mode's x as the kernel sees it: per (row, block) symmetric int8,
    q = round(x * (127 / max|x|)) with the same fp32 arithmetic."""
    m, k = x.shape
    blocks = x.view(m, k // group, group)
    mx = blocks.abs().amax(-1, keepdim=True)
    # (127 / mx would be reciprocal(mx) * 127 in torch: one rounding more than the kernel's)
    inv = torch.where(mx > 0, torch.full_like(mx, 127.0) / mx, torch.zeros_like(mx))
    q = torch.round(blocks * inv).clamp(-127, 127)
    return (q.double() * (mx / 127).double()).view(m, k)


@pytest.mark.parametrize("group", [16, 32, 64, 128])
@pytest.mark.parametrize("M", [1, 2, 3, 8, 9, 17, 64, 70])
def test_int8_activations_match_their_quantized_reference(a8_kernels, group, M):
    kernels = a8_kernels
    m, _ = random_matrix(out=37, inp=group * 5, group=group, bits=4, density=0.5, seed=M + group)
    x = torch.randn(M, m.shape[1], generator=torch.Generator().manual_seed(M)) * 3
    x[0, :group] = 0.0  # an all-zero block of x (scale 0)
    w = m.to_dense().double()
    y = kernels.bsr_linear_a8(
        x, m.indptr, m.indices, m.values, m.scales, m.zeros, m.shape[0], group
    ).double()
    # exact integer dot products: only the fp32 epilogue rounds
    reference = _quantized_x(x, group) @ w.T
    bound = 1e-5 * (_quantized_x(x, group).abs() @ w.abs().T) + 1e-6
    assert ((y - reference).abs() <= bound).all()
    # and against fp32 activations, the error is that of int8 x (about 1/254 of each block's max)
    exact = x.double() @ w.T
    assert (y - exact).abs().max() <= 0.02 * exact.abs().max()
    assert (y - exact).abs().max() > 0  # it is lossy: the test would notice an fp32 fallback


def test_int8_activations_ragged_rows_and_long_k(a8_kernels):
    """Empty, full and ragged rows with K = 10240 and 1 to 3 threads."""
    kernels = a8_kernels
    from effc.runtime.format import from_quantized

    gen = torch.Generator().manual_seed(3)
    out, inp, g = 24, 10240, 16
    codes = torch.randint(0, 16, (out, inp // g, g), generator=gen, dtype=torch.uint8)
    scale = torch.rand(out, inp // g, generator=gen) + 0.1
    zero = torch.randint(0, 16, (out, inp // g), generator=gen).float()
    mask = torch.rand(out, inp // g, generator=gen) < 0.3
    mask[0] = False
    mask[1] = True
    m = from_quantized(codes, scale, zero, mask, 4)
    for M in (1, 5, 12):  # GEMVs (lanes over K; row by row below 8 rows on AVX2), 8-row tiles
        x = torch.randn(M, inp, generator=gen)
        reference = _quantized_x(x, g) @ m.to_dense().double().T
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            y = kernels.bsr_linear_a8(x, m.indptr, m.indices, m.values, m.scales, m.zeros, out, g)
            assert (y[:, 0] == 0).all()
            np.testing.assert_allclose(y.double(), reference, rtol=1e-5, atol=1e-3)
    torch.set_num_threads(2)


def test_activation_mode_errors_and_int8_weights():
    from effc.errors import UnsupportedError
    from effc.runtime.modules import BSRLinear, check_activations

    with pytest.raises(UnsupportedError, match="activations must be one of fp32, int8"):
        check_activations("int4", 4)
    # int8 weights cannot take the int8-x path (code - zero does not fit a byte): they stay exact
    m, _ = random_matrix(out=8, inp=32, group=16, bits=8, density=0.5, seed=1)
    layer = BSRLinear(m, activations="int8")
    assert not layer.a8
    x = torch.randn(4, 32)
    np.testing.assert_allclose(
        layer(x).double(), x.double() @ m.to_dense().double().T, rtol=1e-5, atol=1e-5
    )


def test_int8_activations_propagate_nan_and_inf(a8_kernels):
    """A NaN or inf in x reaches y (as in the fp32 kernel) instead of becoming finite garbage."""
    kernels = a8_kernels
    m, _ = random_matrix(out=16, inp=64, group=16, bits=4, density=1.0, seed=2)
    x = torch.randn(4, 64)
    x[1, 5] = float("nan")
    x[2, 40] = float("inf")
    y = kernels.bsr_linear_a8(x, m.indptr, m.indices, m.values, m.scales, m.zeros, 16, 16)
    assert y[1].isnan().all() and not y[2].isfinite().any()
    assert y[[0, 3]].isfinite().all()
    for row in (1, 2):  # the M = 1 kernel (lanes over K) as well
        one = kernels.bsr_linear_a8(
            x[row : row + 1], m.indptr, m.indices, m.values, m.scales, m.zeros, 16, 16
        )
        assert not one.isfinite().any()
    one = kernels.bsr_linear_a8(x[:1], m.indptr, m.indices, m.values, m.scales, m.zeros, 16, 16)
    torch.testing.assert_close(one, y[:1], rtol=1e-5, atol=1e-4)


def test_a_build_lock_left_by_a_killed_build_does_not_hang_the_next(kernels):
    """torch marks a build in progress with a lock file the builder deletes; a build killed
    mid-way leaves it and every later process used to wait for it forever. effc holds an flock
    (released by the kernel when its holder dies) and removes a lock file found under it."""
    import subprocess
    import sys

    from effc.cache import cache_dir
    from effc.runtime.cpu import build_key

    build = cache_dir() / "torch_extensions" / f"bsr_cpu-{build_key()}"
    (build / "lock").write_text("")  # what a killed build leaves
    code = "from effc.runtime.cpu import kernels; kernels(); print('loaded')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "loaded" in done.stdout, done.stderr[-2000:]
    assert not (build / "lock").exists()
