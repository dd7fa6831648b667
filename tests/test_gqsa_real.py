"""GQSA on the real SmolLM2-135M (reduced configurations of tools/quality; marked slow)."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from _helpers import real_folder

import effc

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("gensim")
    from effc.models.real import smollm2_folder

    folder = real_folder(smollm2_folder)
    from transformers import AutoTokenizer

    from tools.quality.data import split, windows

    tokenizer = AutoTokenizer.from_pretrained(folder)
    calib_text, eval_text = split()
    return folder, windows(tokenizer, calib_text, 4, 128), windows(tokenizer, eval_text, 4, 256)


def _compress(folder, text, calib):
    from effc.ir import FxModel
    from tools.quality.perplexity import load_model

    model = load_model(folder)
    ctx = effc.PassContext(
        calibration=[{"input_ids": w[None].numpy()} for w in calib], error_samples=1
    )
    result = (
        effc.Pipeline.from_text(text).run(FxModel(model, {"input_ids": calib[:1, :32]}), ctx)
        if text
        else None
    )
    return model, result


def test_w4_and_one_shot_w4s50_perplexity_bounds(smollm2):
    from tools.quality.perplexity import perplexity

    folder, calib, evaluation = smollm2
    ppl = {}
    for name, text in {
        "fp32": "",
        "w4": "quantize{bits=4,group=16}",
        "w4s50": "group-prune{sparsity=0.5},quantize{bits=4,group=16,method=gptq}",
    }.items():
        model, _ = _compress(folder, text, calib)
        ppl[name] = perplexity(model, evaluation)
    assert 10 < ppl["fp32"] < 40, ppl
    assert ppl["w4"] < 1.5 * ppl["fp32"], ppl
    assert ppl["fp32"] < ppl["w4"] < ppl["w4s50"], (
        ppl
    )  # one-shot W4S50 loses quality (no training yet)


def test_w4s50_stages_each_lower_perplexity(smollm2):
    """The recipe's stages on real weights (reduced budget): sensitivity allocation keeps the exact
    budget, BQPO and then E2E-OQP each lower perplexity. (OBS beating Wanda needs more calibration
    tokens than this reduced run has: with 512 tokens the 1536-wide Hessians are rank-deficient
    and OBS loses; the committed table uses 8,192.)"""
    from tools.quality.perplexity import perplexity

    folder, calib, evaluation = smollm2
    ppl = {}
    rows = {
        "obs": "group-prune{sparsity=0.5,score=obs,allocate=sensitivity},"
        "quantize{bits=4,group=16,method=gptq}",
        "bqpo": "gqsa-train{stage=bqpo,steps=8,lr=0.003,samples=4}",
        "e2e": "gqsa-train{stage=e2e,steps=8,lr=0.0001,samples=4}",
    }
    model, result = _compress(folder, rows["obs"], calib)
    ppl["obs"] = perplexity(model, evaluation)
    prune = result.report.records[0].stats
    assert prune["groups_pruned"] == round(0.5 * prune["groups_total"])
    assert len(set(prune["allocation"]["layer_sparsity"].values())) > 2
    ctx = effc.PassContext(calibration=[{"input_ids": w[None].numpy()} for w in calib])
    effc.Pipeline.from_text(rows["bqpo"]).run(result.model, ctx)
    ppl["bqpo"] = perplexity(model, evaluation)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    notes = copy.deepcopy(result.model.compression)
    effc.Pipeline.from_text(rows["e2e"]).run(result.model, ctx)
    ppl["e2e"] = perplexity(model, evaluation)
    # the same E2E budget with the KL to the original model as its loss, from the same start
    model.load_state_dict(state)
    result.model.compression = notes
    effc.Pipeline.from_text(rows["e2e"][:-1] + ",loss=kd}").run(result.model, ctx)
    ppl["e2e_kd"] = perplexity(model, evaluation)
    assert ppl["bqpo"] < ppl["obs"] and max(ppl["e2e"], ppl["e2e_kd"]) < ppl["bqpo"], ppl


def test_gptq_lowers_layer_output_error_against_rtn_on_real_weights(smollm2):
    from effc.passes.quantize import dequantize, gptq, rtn
    from tools.quality.perplexity import load_model

    folder, calib, _ = smollm2
    model = load_model(folder)
    names = [
        "model.layers.0.self_attn.q_proj",
        "model.layers.10.mlp.down_proj",
        "model.layers.29.mlp.up_proj",
    ]
    inputs = {n: [] for n in names}
    hooks = [
        model.get_submodule(n).register_forward_hook(
            lambda m, a, o, n=n: inputs[n].append(a[0].reshape(-1, a[0].shape[-1]))
        )
        for n in names
    ]
    with torch.no_grad():
        for w in calib:
            model(input_ids=w[None])
    for h in hooks:
        h.remove()
    for name in names:
        x = torch.cat(inputs[name])
        w = model.get_submodule(name).weight.detach()
        H = 2 * x.T @ x / x.shape[0]
        ref = x @ w.T
        err = {}
        for method, (c, s, z) in {
            "rtn": rtn(w, 4, 64, False),
            "gptq": gptq(w, H, 4, 64, False),
        }.items():
            err[method] = float(((x @ dequantize(c, s, z).T - ref) ** 2).mean())
        assert err["gptq"] < 0.9 * err["rtn"], (name, err)


def test_w4s50_one_shot_gives_the_same_weights_through_fx_and_onnx(smollm2):
    from effc.ir import OnnxModel
    from effc.ir.sites import read_weight, weight_sites
    from effc.ir.torch_io import export_onnx
    from tools.quality.perplexity import load_model

    folder, calib, _ = smollm2
    text = "group-prune{sparsity=0.5,score=magnitude},quantize{bits=4,group=16}"
    onnx = OnnxModel(export_onnx(load_model(folder), {"input_ids": calib[:1, :32]}))
    onnx_result = effc.Pipeline.from_text(text).run(onnx, effc.PassContext(eval_seeds=0))
    fx_model, fx_result = _compress(folder, text, calib)
    a = {s.fqn: read_weight(s) for s in weight_sites(fx_result.model)}
    b = {s.fqn: read_weight(s) for s in weight_sites(onnx_result.model)}
    assert a.keys() == b.keys() and len(a) == 211
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


def test_w4s50_bsr_decoding_gives_the_dequantized_models_tokens(smollm2):
    """The BSR kernels swapped into SmolLM2 (lm_head included) decode the same greedy tokens as
    the dequantized dense weights, in effc's static-cache loop and under HF generate()."""
    from effc.runtime.decode import StaticDecoder
    from effc.runtime.modules import swap_linears

    folder, calib, evaluation = smollm2
    model, result = _compress(folder, "group-prune{sparsity=0.5},quantize{bits=4,group=16}", calib)
    prompt = evaluation[0, :24]
    dense = StaticDecoder(model, 64).generate(prompt, 16).tokens
    records = swap_linears(model, result.model.compression, decide=False)
    assert len(records) == 211
    assert StaticDecoder(model, 64).generate(prompt, 16).tokens == dense
    model.config.use_cache = True
    with torch.no_grad():
        hf = model.generate(prompt[None], max_new_tokens=16, min_new_tokens=16, do_sample=False)
    assert hf[0, 24:].tolist() == dense


def test_int8_activations_cost_little_perplexity(smollm2):
    """The opt-in int8-activation BSR mode on real W4 weights: fp32-activation kernels equal the
    fake-quantized model, int8 activations stay within 3% of its perplexity (but differ)."""
    from tools.quality.activations import measure

    result = measure("quantize{bits=4,group=16}", n_windows=2, seqlen=256, calib_samples=2)
    reference, fp32, int8 = (r["perplexity"] for r in result["rows"])
    assert reference < 60  # W4 g16 RTN stays near fp32 SmolLM2 (about 25 on these windows)
    assert fp32 == pytest.approx(reference, rel=1e-4)
    assert int8 != fp32 and int8 == pytest.approx(reference, rel=0.03)


def test_rearrange_on_smollm2_is_lossless_and_lowers_the_probe_error(smollm2):
    from tools.quality.perplexity import perplexity

    folder, calib, evaluation = smollm2
    dense, _ = _compress(folder, "", calib)
    model, result = _compress(folder, "rearrange{group=16}", calib)
    stats = result.report.records[-1].stats
    assert stats["regions"] == 30  # every layer's down_proj, fed by gate_proj and up_proj
    assert stats["rearranged"] >= 20
    # the group-pruned probe error the order is chosen by, summed over the layers
    assert stats["probe_error_sum"]["after"] < 0.85 * stats["probe_error_sum"]["before"]
    x = evaluation[:1]
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, dense(x).logits, rtol=1e-4, atol=1e-4)
    assert perplexity(model, evaluation[:2]) == pytest.approx(
        perplexity(dense, evaluation[:2]), rel=1e-5
    )
