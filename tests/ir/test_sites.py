import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import effc
from effc.ir.blocks import find_blocks
from effc.ir.model import FxModel
from effc.ir.sites import read_weight, weight_sites, write_weight


@pytest.fixture
def fx_llama():
    from effc.models import BUILTINS

    m = BUILTINS["tiny-llama"][0]()
    return FxModel(m, m.example_inputs())


def _by_name(model):
    return {s.fqn: s for s in weight_sites(model)}


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_fx_and_onnx_give_the_same_sites_and_values(fx_llama, llama_onnx, exporter):
    fx = _by_name(fx_llama)
    onnx = _by_name(effc.load(str(llama_onnx[exporter])))
    assert list(fx) == list(onnx)
    assert len(fx) == 2 * 7 + 1
    for name, site in fx.items():
        assert site.shape == onnx[name].shape, name
        np.testing.assert_array_equal(read_weight(site).numpy(), read_weight(onnx[name]).numpy())


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_tied_lm_head_is_one_site_with_two_uses(fx_llama, llama_onnx, exporter):
    for model in (fx_llama, effc.load(str(llama_onnx[exporter]))):
        head = _by_name(model)["lm_head"]
        assert head.tied_with == ["model.embed_tokens"]
        assert head.shape == (256, 64)


def test_sites_view_weights_as_out_by_in(fx_llama):
    site = _by_name(fx_llama)["model.layers.0.mlp.down_proj"]
    assert site.shape == (64, 160) and (site.out_features, site.in_features) == (64, 160)


def test_conv_sites_keep_groups(tiny_cnn):
    sites = weight_sites(FxModel(tiny_cnn, tiny_cnn.example_inputs()))
    assert [s.groups for s in sites if s.op == "conv"] == [1, 16, 1, 32, 1]
    assert sites[1].shape == (16, 1, 3, 3) and sites[1].in_features == 16


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), exporter=st.sampled_from(["dynamo", "legacy"]))
def test_write_then_read_round_trips_and_changes_outputs_the_same_on_both_irs(
    llama_onnx, seed, exporter
):
    from effc.models import BUILTINS

    module = BUILTINS["tiny-llama"][0]()
    fx = FxModel(module, module.example_inputs())
    onnx = effc.load(str(llama_onnx[exporter]))
    g = torch.Generator().manual_seed(seed)
    for model in (fx, onnx):
        for site in weight_sites(model):
            if site.tied_with:
                continue
            new = 0.05 * torch.randn(
                site.shape, generator=torch.Generator().manual_seed(seed + len(site.fqn))
            )
            write_weight(site, new)
            assert torch.equal(read_weight(site), new)
    x = {"input_ids": torch.randint(0, 256, (1, 16), generator=g).numpy()}
    np.testing.assert_allclose(fx.run(x)[0], onnx.run(x)[0], rtol=1e-4, atol=1e-4)


def test_write_rejects_a_wrong_shape(fx_llama):
    site = weight_sites(fx_llama)[0]
    with pytest.raises(ValueError, match="new weight shape"):
        write_weight(site, torch.zeros(3, 3))


def test_blocks_are_found_on_both_irs(fx_llama, llama_onnx):
    for model in (
        fx_llama,
        effc.load(str(llama_onnx["dynamo"])),
        effc.load(str(llama_onnx["legacy"])),
    ):
        blocks = find_blocks(model)
        assert [b.fqn for b in blocks] == ["model.layers.0", "model.layers.1"]
        assert all(len(b.sites) == 7 for b in blocks)


def test_no_blocks_where_nothing_repeats(tiny_cnn):
    assert find_blocks(FxModel(tiny_cnn, tiny_cnn.example_inputs())) == []
