from pathlib import Path

import numpy as np
import pytest
import torch

import effc
from effc.errors import UnsupportedError
from effc.ir.sites import read_weight, weight_sites
from effc.passes.nm_prune import nm_mask
from effc.passes.quantize import dequantize, gptq, rtn


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_rtn_codes_in_range_and_error_within_half_a_step(bits, symmetric):
    w = torch.randn(16, 64)
    codes, scale, zero = rtn(w, bits, 16, symmetric)
    assert codes.min() >= 0 and codes.max() <= 2**bits - 1
    if symmetric:
        assert torch.all(zero == 2 ** (bits - 1))
    deq = dequantize(codes, scale, zero)
    err = (deq - w).abs().view(16, 4, 16)
    # half a step, plus what rounding the scale to fp16 (rel. 2^-11) costs over 2^bits steps
    assert torch.all(err <= scale[..., None] * (0.5 + 2**bits * 2**-11) + 1e-6)

    assert torch.equal(scale, scale.half().float())  # what BSR stores


def test_gptq_lowers_layer_output_error_against_rtn():
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(64, 64, generator=g)
    x = torch.randn(512, 64, generator=g) @ mix  # correlated inputs, as in a real layer
    w = torch.randn(32, 64, generator=g)
    H = 2 * x.T @ x / x.shape[0]
    err = {}
    for name, (c, s, z) in {"rtn": rtn(w, 3, 16, False), "gptq": gptq(w, H, 3, 16, False)}.items():
        err[name] = float(((x @ dequantize(c, s, z).T - x @ w.T) ** 2).mean())
    assert err["gptq"] < 0.8 * err["rtn"], err


def test_gptq_keeps_pruned_groups_exactly_zero():
    w = torch.randn(8, 64)
    mask = torch.rand(8, 4) > 0.5
    x = torch.randn(100, 64)
    c, s, z = gptq(w, x.T @ x, 4, 16, False, mask)
    deq = dequantize(c, s, z, mask).view(8, 4, 16)
    assert torch.all(deq[~mask] == 0)


def test_prune_then_quantize_records_compression_state_and_requires_matching_groups(tiny_llama):
    from effc.models import BUILTINS

    model = BUILTINS["tiny-llama"][0]()
    result = effc.Pipeline.from_text("group-prune{score=magnitude},quantize{bits=4,group=16}").run(
        model
    )
    notes = result.model.compression.sites["model.layers.0.mlp.down_proj"]
    assert notes.mask.shape == (64, 10) and notes.codes.shape == (64, 10, 16) and notes.bits == 4
    site = next(s for s in weight_sites(result.model) if s.fqn == "model.layers.0.mlp.down_proj")
    torch.testing.assert_close(
        read_weight(site),
        dequantize(notes.codes.float(), notes.scale, notes.zero.float(), notes.mask),
    )
    with pytest.raises(UnsupportedError, match="does not coincide with the pruning group"):
        effc.Pipeline.from_text("group-prune{score=magnitude,group=16},quantize{group=32}").run(
            BUILTINS["tiny-llama"][0]()
        )


def test_nm_mask_keeps_exactly_n_of_m():
    scores = torch.rand(8, 32)
    mask = nm_mask(scores, 2, 4)
    assert torch.all(mask.view(8, 8, 4).sum(-1) == 2)


def test_quantize_gives_the_same_weights_on_fx_and_onnx(llama_onnx):
    from effc.models import BUILTINS

    rng = np.random.default_rng(0)
    calib = [{"input_ids": rng.integers(0, 256, (1, 16)).astype(np.int64)} for _ in range(3)]
    text = "group-prune{sparsity=0.3},quantize{bits=4,group=16,method=gptq}"
    fx = effc.Pipeline.from_text(text).run(
        BUILTINS["tiny-llama"][0](), effc.PassContext(calibration=calib)
    )
    onnx = effc.Pipeline.from_text(text).run(
        str(llama_onnx["dynamo"]), effc.PassContext(calibration=calib)
    )
    a = {s.fqn: read_weight(s) for s in weight_sites(fx.model)}
    b = {s.fqn: read_weight(s) for s in weight_sites(onnx.model)}
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_nm_prune_obs_keeps_n_of_m_and_beats_wanda_on_the_layer_output():
    """SparseGPT-style 2:4 (the nm-prune{score=obs} sweep): exactly 2 of 4 kept, and a lower
    output error on the calibration inputs than Wanda's 2:4, as it compensates the pruned weights."""
    from effc.passes._obs import inverse_hessian_factor, obs_prune, obs_scores

    g = torch.Generator().manual_seed(0)
    mix = torch.randn(64, 64, generator=g) / 8 + torch.eye(64)
    x = torch.randn(512, 64, generator=g) @ mix
    w = torch.randn(24, 64, generator=g)
    H = 2 * x.T @ x / 512
    factor = inverse_hessian_factor(H)
    keep = nm_mask(obs_scores(w, *factor, 1), 2, 4)
    obs = obs_prune(w, factor, keep, 1)
    assert torch.all((obs != 0).view(24, 16, 4).sum(-1) == 2)
    wanda = w * nm_mask(w.abs() * x.norm(dim=0)[None, :], 2, 4)
    err = lambda p: float(((x @ (p - w).T) ** 2).sum())  # noqa: E731
    assert err(obs) < 0.95 * err(wanda)


def test_onnx_weights_in_external_data_stay_out_of_memory(tmp_path):
    """An ONNX model whose weights are in external data: quantize keeps each weight's original
    as a copy-on-write map of the file (no copy in memory) and writes the fake-quantized weight
    as a LazyTensor made from the codes when read: its values are the codes' dequantization, the
    file is untouched, and the written model runs under onnxruntime as the same weights would."""
    import onnx_ir as ir

    from effc.backends import onnxruntime as ort_backend
    from effc.compile import compile_model
    from tools.bench.scale import write_onnx_mlp

    write_onnx_mlp(tmp_path / "m", blocks=2, hidden=64, inter=128, tokens=4)
    data = (tmp_path / "m" / "model.onnx.data").read_bytes()
    model = effc.load(str(tmp_path / "m" / "model.onnx"))
    result = effc.Pipeline.from_text("quantize{bits=4,group=16}").run(model, effc.PassContext())
    states = result.model.compression.sites
    assert len(states) == 4
    for site in weight_sites(result.model):
        const = site.handle[0].const_value
        assert isinstance(const, ir.LazyTensor), site.fqn
        state = states[site.fqn]
        assert _mapped_file(state.original.data_ptr()).endswith("model.onnx.data")
        np.testing.assert_array_equal(read_weight(site).numpy(), state.dequantized().numpy())
        assert not torch.equal(state.original, state.dequantized())
    assert (tmp_path / "m" / "model.onnx.data").read_bytes() == data
    compile_model(str(tmp_path / "m" / "model.onnx"), "quantize{bits=4,group=16}", tmp_path / "o")
    # saved the way it came: the packed weights in external data, not one protobuf of them all
    assert (tmp_path / "o" / "model.onnx.data").stat().st_size > 4 * 64 * 128 // 2
    x = {"x": np.random.default_rng(0).standard_normal((1, 4, 64), dtype=np.float32)}
    (got,) = ort_backend.run(tmp_path / "o", x).values()
    want = result.model.run(x)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("text", ["group-prune{sparsity=0.5,group=16,score=obs}", "nm-prune"])
def test_pruning_an_onnx_model_in_external_data_keeps_its_weights_on_disk(tmp_path, text):
    """Pruning passes on a model whose weights are in external data: the originals map the file,
    each pruned weight goes to a scratch file and is read back from it (a LazyTensor over a
    mapped file, not a copy in memory), and the weights and outputs equal the same pass on the
    same model held in memory; the model's own file is untouched."""
    import onnx
    import onnx_ir as ir

    from tools.bench.scale import write_onnx_mlp

    write_onnx_mlp(tmp_path / "m", blocks=2, hidden=64, inter=128, tokens=4)
    source = tmp_path / "m" / "model.onnx"
    data = (tmp_path / "m" / "model.onnx.data").read_bytes()
    onnx.save(onnx.load(str(source)), str(tmp_path / "whole.onnx"))  # the same, in one file
    rng = np.random.default_rng(0)
    calib = [{"x": rng.standard_normal((1, 4, 64), dtype=np.float32)} for _ in range(4)]
    ctx = lambda: effc.PassContext(calibration=calib)  # noqa: E731
    disk = effc.Pipeline.from_text(text).run(effc.load(str(source)), ctx())
    memory = effc.Pipeline.from_text(text).run(effc.load(str(tmp_path / "whole.onnx")), ctx())
    states = disk.model.compression.sites
    from effc.ir import sites as sites_module

    spilled = {f.stat().st_size for f in Path(sites_module._SCRATCH[0]).iterdir()}
    for site, other in zip(weight_sites(disk.model), weight_sites(memory.model)):
        const = site.handle[0].const_value
        assert isinstance(const, ir.LazyTensor), site.fqn
        assert 4 * int(np.prod(site.shape)) in spilled  # its fp32 values in a scratch file
        assert _mapped_file(states[site.fqn].original.data_ptr()).endswith("model.onnx.data")
        np.testing.assert_array_equal(read_weight(site).numpy(), read_weight(other).numpy())
    assert (tmp_path / "m" / "model.onnx.data").read_bytes() == data
    x = {"x": rng.standard_normal((1, 4, 64), dtype=np.float32)}
    np.testing.assert_array_equal(disk.model.run(x)[0], memory.model.run(x)[0])


def _mapped_file(address: int) -> str:
    """The file mapped at ``address`` in this process ('' for anonymous memory)."""
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            start, end = (int(a, 16) for a in fields[0].split("-"))
            if start <= address < end:
                return fields[5].strip() if len(fields) > 5 else ""
    return ""
