import numpy as np
import torch

import effc
from effc.runtime.modules import BSRLinear, choose, swap_linears


def test_swapped_model_matches_the_fake_quantized_model():
    from effc.models import BUILTINS

    model = BUILTINS["tiny-llama"][0]()
    rng = np.random.default_rng(0)
    calib = [{"input_ids": rng.integers(0, 256, (1, 16)).astype(np.int64)} for _ in range(2)]
    result = effc.Pipeline.from_text("group-prune{sparsity=0.5},quantize{bits=4,group=16}").run(
        model, effc.PassContext(calibration=calib)
    )
    x = model.example_inputs(batch=2)
    with torch.no_grad():
        reference = model(**x)
        records = swap_linears(model, result.model.compression, decide=False)
        swapped = model(**x)
    assert len(records) == 15 and all(r["choice"] == "sparse" for r in records)
    assert isinstance(model.lm_head, BSRLinear) and isinstance(
        model.model.layers[1].mlp.down_proj, BSRLinear
    )
    torch.testing.assert_close(swapped, reference, rtol=1e-4, atol=1e-4)
    head = next(r for r in records if r["layer"] == "lm_head")
    assert abs(head["density"] - 0.5) < 1e-9
    assert sum(head["bytes"].values()) < head["dense_bytes"] / 7


def test_dense_fallback_is_chosen_by_measurement():
    from effc.models import BUILTINS

    model = BUILTINS["tiny-llama"][0]()
    result = effc.Pipeline.from_text("quantize{bits=8,group=16}").run(model)
    records = swap_linears(model, result.model.compression, batch=4)
    for r in records:
        assert r["choice"] == choose(r["sparse_ms"], r["dense_ms"]) and r["rotation"] >= 2
        assert isinstance(model.get_submodule(r["layer"]), BSRLinear) == (r["choice"] == "sparse")


def test_dense_only_when_faster_by_more_than_the_margin():
    assert choose(1.00, 0.96) == "sparse"  # a tie within 5% goes to the smaller (packed) form
    assert choose(1.00, 0.94) == "dense"
    assert choose(0.50, 1.00) == "sparse"
    assert choose(0.004, 0.0025) == "sparse"  # 1.5 us apart: below timer noise, a tie
